"""`mindscedit sample`: load a model folder, put trained weights on it, write PNGs and grids."""
import argparse
import math
import os
from typing import List

from ..data.conditions import ANNOTATORS, load_control_image
from ..data.sources import read_utf8_lines
from ..errors import UserError
from .schedulers import SCHEDULERS, check_scheduler


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="diffusers model folder")
    parser.add_argument("--unet", help="a fully fine-tuned UNet (vanilla training's output folder, or its unet/) "
                                       "in place of the model folder's")
    parser.add_argument("--scedit", help="SC-Tuner weights: a training output folder or adapter_model.safetensors")
    parser.add_argument("--lora", action="append", default=[], help="pytorch_lora_weights.safetensors (repeatable)")
    parser.add_argument("--embeddings", help="pivotal tuning's new-token embeddings (a run's <name>_emb.safetensors: "
                                             "clip_l, and clip_g for SDXL); prompts then write the new tokens, or the "
                                             "word they were trained for")
    parser.add_argument("--tokens", help='the tokens --embeddings holds, comma-separated, e.g. "<s0>,<s1>" (default: '
                                         "the ones the file names)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt_file", help="a text file, one prompt per line")
    parser.add_argument("--negative_prompt", default="", help="default none: the encoded empty prompt, or zero "
                                                              "embeddings where the pipeline says so (SDXL)")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="<= 1: no classifier-free guidance")
    parser.add_argument("--seed", type=int, default=0, help="image k of each prompt uses seed + k")
    parser.add_argument("--height", type=int, help="default: the UNet's sample size x 8")
    parser.add_argument("--width", type=int)
    parser.add_argument("--num_images_per_prompt", type=int, default=1)
    parser.add_argument("--scheduler", help=f"{', '.join(SCHEDULERS)}; default: the model family's (ddim for "
                                            "SD1.x/2.x, euler for SDXL, edm_dpm++_2m for Playground-style EDM models)")
    parser.add_argument("--tuner_scale", type=float, default=1.0, help="SC-Tuner strength (0: base model)")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="LoRA strength (0: base model)")
    parser.add_argument("--csc_tuner", action="append", default=[],
                        help="CSC-Tuner weights (csc_tuner.safetensors or its folder); repeatable, one per --control_image")
    parser.add_argument("--control_image", action="append", default=[], help="condition image (repeatable)")
    parser.add_argument("--control_type", action="append", default=[],
                        help="annotate the control image first: canny, color, grayscale, inpainting, or none "
                             "(the image is the condition already); one per --control_image, default none")
    parser.add_argument("--control_scale", action="append", default=[], type=float,
                        help="strength of each condition (default 1; 0: no control)")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                        help="the model's dtype (no: fp32); fp16 is the usual choice on Ascend. Tuners and LoRAs keep "
                             "their fp32 weights and compute in them")
    parser.add_argument("--device_target", default="auto", choices=["auto", "CPU", "Ascend"])
    parser.add_argument("--output_dir", required=True)


def read_prompts(args) -> List[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise UserError(f"--prompt_file not found: {args.prompt_file}")
        prompts += [line.strip() for _, line in read_utf8_lines(args.prompt_file) if line.strip()]
    if not prompts:
        raise UserError("give at least one --prompt or a --prompt_file with prompts")
    return prompts


def run_sample(args) -> dict:
    """Checks the flags, samples, saves; returns save_images' {"images": [...], "grids": [...]}."""
    prompts = read_prompts(args)
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler: '{args.scheduler}' is not one of {', '.join(SCHEDULERS)}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    for flag in ("num_inference_steps", "num_images_per_prompt"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("guidance_scale", "tuner_scale", "lora_scale"):
        if not math.isfinite(getattr(args, flag)):
            raise UserError(f"--{flag} must be a finite number, got {getattr(args, flag)}")
    if not all(math.isfinite(v) for v in args.control_scale):
        raise UserError(f"--control_scale must be finite numbers, got {args.control_scale}")
    if len(args.control_image) != len(args.csc_tuner):
        raise UserError(f"give one --control_image per --csc_tuner (got {len(args.control_image)} and {len(args.csc_tuner)})")
    for flag in ("control_type", "control_scale"):
        if len(getattr(args, flag)) > len(args.control_image):
            raise UserError(f"more --{flag} values than --control_image")
    for path in args.control_image:
        if not os.path.isfile(path):
            raise UserError(f"--control_image not found: {path}")
    for kind in args.control_type:
        if kind != "none" and kind not in ANNOTATORS:
            raise UserError(f"--control_type: '{kind}' is not one of none, {', '.join(ANNOTATORS)}")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{flag} must be a positive multiple of 8, got {value}")

    from ..models import load_components
    from ..models.family import detect_family
    from ..models.loading import load_unet_folder
    from ..runtime import DTYPES, init_runtime
    from .adapters import apply_csc_tuners, apply_loras, apply_sc_tuners
    from .images import save_images
    from .sampler import Sampler

    runtime = init_runtime(args.device_target)
    if runtime.device_target == "CPU" and args.mixed_precision == "bf16":
        raise UserError("--mixed_precision bf16 needs an Ascend device (MindSpore's CPU has no bf16 MatMul kernel)")
    family = detect_family(args.pretrained_model_name_or_path)
    check_scheduler(args.scheduler or family.default_scheduler, family.noise_schedule)  # before minutes of loading
    if args.tokens and not args.embeddings:
        raise UserError("--tokens names the tokens of --embeddings; give --embeddings too")
    embeddings = None
    if args.embeddings:
        from ..tuners.textual_inversion import EMBEDDING_KEYS, read_embeddings

        embeddings = read_embeddings(args.embeddings, EMBEDDING_KEYS[:len(family.text_encoders)], args.tokens)
    components = load_components(args.pretrained_model_name_or_path, DTYPES[args.mixed_precision])
    if embeddings:
        rows, new_tokens = embeddings
        components.add_new_tokens(new_tokens, rows)
    if args.unet:
        components.unet = load_unet_folder(args.unet, DTYPES[args.mixed_precision])
    # Before SC-Tuners wrap the up blocks; a file's text-encoder parts go on the text encoders.
    apply_loras(components.unet, args.lora, args.lora_scale,
                dict(zip(components.family.text_encoders, components.text_encoders)))
    if args.scedit:
        apply_sc_tuners(components.unet, args.scedit, args.tuner_scale)
    controlled = apply_csc_tuners(components.unet, args.csc_tuner) if args.csc_tuner else None
    factor = components.vae_scale_factor
    height = args.height or components.unet.config.sample_size * factor
    width = args.width or components.unet.config.sample_size * factor
    control_images = [
        load_control_image(path, kind, height, width)
        for path, kind in zip(args.control_image, args.control_type + ["none"] * len(args.control_image))
    ]
    images = Sampler(components, args.scheduler, controlled)(
        prompts,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images_per_prompt,
        control_images=control_images or None,
        control_scales=args.control_scale or None,
    )
    return save_images(images, args.output_dir)
