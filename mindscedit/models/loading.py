"""Load the pieces of a Stable Diffusion pipeline from a local diffusers-format folder.

The folder is what `save_pretrained` writes (and what the model hubs ship): `model_index.json`
plus `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/` subfolders, weights as
safetensors. Nothing is downloaded: a missing piece is a one-line error that names it.
"""
import glob
import json
import os
from dataclasses import dataclass
from typing import Any

import mindspore as ms

from ..errors import ModelFolderError, UserError

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}


@dataclass
class PipelineComponents:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    family: Any = None  # models.family: how prompts and latents reach the UNet
    text_encoder_2: Any = None  # SDXL's second text encoder (CLIPTextModelWithProjection) and tokenizer
    tokenizer_2: Any = None
    scheduler_config: dict = None  # the folder's scheduler config as written (e.g. SDXL's Euler), with _class_name
    pipeline_config: dict = None  # model_index.json (e.g. SDXL's force_zeros_for_empty_prompt)
    new_tokens: Any = None  # pivotal tuning's tokens (tuners/textual_inversion), once added

    def __post_init__(self):
        if self.family is None:
            from .family import StableDiffusion

            self.family = StableDiffusion

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> list:
        return [getattr(self, name) for name in self.family.text_encoders]

    @property
    def tokenizers(self) -> list:
        return [getattr(self, name) for name in self.family.tokenizers]

    def add_new_tokens(self, new_tokens, rows=None, seed: int = 0) -> list:
        """Pivotal tuning's tokens in every tokenizer and text encoder (rows: saved ones, else drawn with
        seed); prompts then name them by their abstractions. Returns the new-row Parameters."""
        from ..tuners.textual_inversion import add_new_tokens

        params = add_new_tokens(self.tokenizers, self.text_encoders, new_tokens, rows, seed)
        self.new_tokens = new_tokens
        return params

    def rewrite_prompt(self, prompt: str) -> str:
        return self.new_tokens.rewrite(prompt) if self.new_tokens is not None else prompt


def check_model_folder(path: str, subfolders=SUBFOLDERS) -> None:
    """Fail with one line naming the first missing file or folder of a diffusers pipeline folder."""
    if not os.path.isdir(path):
        raise ModelFolderError(f"model folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ModelFolderError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    for sub in subfolders:
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            raise ModelFolderError(f"model folder {path} has no '{sub}/' subfolder")
        if sub in WEIGHT_FILES:
            stem = WEIGHT_FILES[sub]
            has_single = os.path.isfile(os.path.join(folder, f"{stem}.safetensors"))
            has_sharded = os.path.isfile(os.path.join(folder, f"{stem}.safetensors.index.json"))
            if not (has_single or has_sharded):
                found = sorted(os.path.basename(f) for f in glob.glob(os.path.join(folder, "*")))
                raise ModelFolderError(
                    f"no {stem}.safetensors in {folder} (found: {', '.join(found) or 'nothing'}); "
                    "only safetensors weights can be loaded"
                )
        if not os.path.isfile(os.path.join(folder, "config.json")) and sub not in ("tokenizer", "tokenizer_2", "scheduler"):
            raise ModelFolderError(f"{folder} has no config.json")
    if "scheduler" in subfolders and not glob.glob(os.path.join(path, "scheduler", "*.json")):
        raise ModelFolderError(f"{os.path.join(path, 'scheduler')} has no scheduler_config.json")


def load_tokenizer(path: str, subfolder: str = "tokenizer"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path, subfolder=subfolder, local_files_only=True)


def load_noise_scheduler(path: str, family=None):
    """The model's noise schedule as a scheduler. For a DDPM-schedule family: DDPM over the
    folder's betas, whichever sampler the folder's config names (SDXL ships an
    EulerDiscreteScheduler config; diffusers' training scripts do the same). For an EDM family
    (Playground): the folder's own EDM scheduler, whose config holds the sigmas (a DDPM built from
    it would get default betas, silently not the model's)."""
    import mindone.diffusers

    if family is None or family.noise_schedule == "ddpm":
        return mindone.diffusers.DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    name = load_scheduler_config(path).get("_class_name", "")
    if not hasattr(mindone.diffusers, name):
        raise ModelFolderError(f"{os.path.join(path, 'scheduler')}: scheduler class '{name}' is not in mindone.diffusers")
    return getattr(mindone.diffusers, name).from_pretrained(path, subfolder="scheduler", local_files_only=True)


def load_pipeline_config(path: str) -> dict:
    with open(os.path.join(path, "model_index.json")) as f:
        return json.load(f)


def load_scheduler_config(path: str) -> dict:
    """The folder's scheduler config as written: its `_class_name` and every setting."""
    from mindone.diffusers import DDPMScheduler

    return dict(DDPMScheduler.load_config(path, subfolder="scheduler", local_files_only=True))


FLASH_ATTENTION_ENV = "MINDSCEDIT_FLASH_ATTENTION"


def apply_flash_attention_setting(unet):
    """mindone runs Ascend's FlashAttentionScore whenever the device is Ascend, but only Atlas A2
    (910B) chips have that kernel: MINDSCEDIT_FLASH_ATTENTION=0 (for 910A) makes every attention
    layer take mindone's plain attention instead. Returns the UNet."""
    from mindone.diffusers.models.attention_processor import Attention

    setting = os.environ.get(FLASH_ATTENTION_ENV, "1")
    if setting not in ("0", "1"):
        raise UserError(f"{FLASH_ATTENTION_ENV}={setting!r}: expected 1 (flash attention where mindone has it) "
                        "or 0 (plain attention, for 910A)")
    if setting == "0":
        for _, cell in unet.cells_and_names():
            if isinstance(cell, Attention):
                cell.enable_flash_sdp(False)
    return unet


def load_unet(path: str, dtype=ms.float32):
    from mindone.diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", mindspore_dtype=dtype, local_files_only=True)
    return apply_flash_attention_setting(unet)


def load_unet_folder(path: str, dtype=ms.float32):
    """A UNet saved on its own, as vanilla training writes it: `path/unet/` or `path` itself
    (config.json and diffusion_pytorch_model.safetensors)."""
    from mindone.diffusers import UNet2DConditionModel

    folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ModelFolderError(f"--unet: {folder} has no {name} (expected a UNet folder as vanilla training "
                                   "writes it: OUTPUT_DIR/unet)")
    unet = UNet2DConditionModel.from_pretrained(folder, mindspore_dtype=dtype, local_files_only=True)
    return apply_flash_attention_setting(unet)


def load_components(path: str, dtype=ms.float32) -> PipelineComponents:
    """Load the UNet, VAE, text encoders, tokenizers and DDPM noise scheduler of the folder's
    family (models/family.py) from a local folder."""
    from .family import detect_family

    family = detect_family(path)
    check_model_folder(path, family.subfolders)
    try:
        vae = load_vae(path, dtype)
        vae_dtype = family.vae_dtype(vae.config, dtype)
        if vae_dtype != dtype:
            vae.to(vae_dtype)
        return PipelineComponents(
            unet=load_unet(path, dtype),
            vae=vae,
            noise_scheduler=load_noise_scheduler(path, family),
            scheduler_config=load_scheduler_config(path),
            pipeline_config=load_pipeline_config(path),
            family=family,
            **{name: load_text_encoder(path, name, dtype) for name in family.text_encoders},
            **{name: load_tokenizer(path, name) for name in family.tokenizers},
        )
    except (OSError, ValueError) as err:  # ValueError: a config the model class refuses (JSONDecodeError too)
        # The loaders raise long multi-line messages; keep the first line, which names the file.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFolderError(f"cannot load the model in {path}: {first_line}") from err


def load_vae(path: str, dtype=ms.float32):
    from mindone.diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(path, subfolder="vae", mindspore_dtype=dtype, local_files_only=True)


# The text encoder class of each subfolder: SDXL's second encoder has the pooled projection.
TEXT_ENCODER_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


def load_text_encoder(path: str, subfolder: str, dtype=ms.float32):
    import mindone.transformers

    model_class = getattr(mindone.transformers, TEXT_ENCODER_CLASSES[subfolder])
    return model_class.from_pretrained(os.path.join(path, subfolder), mindspore_dtype=dtype, local_files_only=True)


def build_unet(config: dict, dtype=ms.float32):
    """A UNet of the given config with random weights (benchmarks, parameter counts)."""
    from mindone.diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**config)
    if dtype != ms.float32:
        unet.to(dtype)
    return apply_flash_attention_setting(unet)
