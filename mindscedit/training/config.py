"""Training configuration: one definition gives the YAML keys, the flags, `--help` and the checks.

Every setting is a field of TrainConfig declared with `setting(...)`: its default, a one-line
description, its choices or lower bound, the `--help` group it is listed under and, for options
of one method or optimizer, the YAML section it may also be written in (`lora: {rank: 8}` is
`rank: 8`). Flag names follow diffusers' training scripts, so a user who knows
train_text_to_image.py knows these. Every check here runs before any model is loaded and fails
with one line that names the key or flag; checks that only make sense for one method live in
that method (methods.py).
"""
import argparse
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Callable, List, Optional, Sequence, Union

import yaml

from ..errors import UserError
from ..runtime import BF16_ON_CPU

JIT_LEVELS = ("O0", "O1", "O2")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
DEFAULT_MAX_TRAIN_STEPS = 1000  # when neither max_train_steps nor num_train_epochs is given
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _method_names():
    from .methods import TRAINABLE_METHODS

    return tuple(TRAINABLE_METHODS)


def _optimizer_names():
    from .optimizers import OPTIMIZERS

    return tuple(OPTIMIZERS)


def setting(default=None, help: str = "", *, choices: Union[Sequence, Callable, None] = None,
            at_least: Optional[float] = None, above: Optional[float] = None, below: Optional[float] = None,
            may_be_inf: bool = False, group: str = "", section: Optional[str] = None, key: Optional[str] = None,
            default_factory=None):
    """A TrainConfig field with what `--help`, the YAML reader and validate() need to know of it.

    choices: the allowed values (or a function returning them, for registries); at_least /
    above / below: the bounds a number must keep (>= / > / <); a number must be finite unless
    may_be_inf (then `inf` is allowed, never NaN); section, key: where the field may also be
    written in a YAML section (key defaults to the field's name).
    """
    metadata = dict(help=help, choices=choices, at_least=at_least, above=above, below=below, may_be_inf=may_be_inf,
                    group=group, section=section, key=key)
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _default_compile_cache() -> str:
    return os.environ.get("MINDSCEDIT_COMPILE_CACHE", os.path.join("~", ".cache", "mindscedit", "compile"))


PIVOTAL = "pivotal tuning (new tokens trained with DreamBooth, as diffusers' advanced scripts)"
RUN, DATA, OPTIM, EMA, LORA, TUNER, CONTROL, DEVICE, OUTPUT, VALIDATION = (
    "what to train", "data", "optimisation", "EMA of the weights (diffusers' EMAModel)", "LoRA (method lora)",
    "SC-Tuner and CSC-Tuner (methods scedit, scedit_control)", "controllable generation (method scedit_control)",
    "runtime", "outputs", "validation (images and held-out loss)",
)


@dataclass
class TrainConfig:
    method: str = setting("scedit", "what to fine-tune: the whole UNet, LoRA adapters, SC-Tuners on the skips, or a "
                          "CSC-Tuner for a condition", choices=_method_names, group=RUN)
    pretrained_model_name_or_path: Optional[str] = setting(None, "diffusers model folder (required)", group=RUN)
    output_dir: str = setting("outputs/run", "checkpoints, logs and final weights go here", group=RUN)
    seed: int = setting(0, "seeds weights' initialisation, data order, noise and timesteps", at_least=0, group=RUN)

    train_data_dir: Optional[str] = setting(None, "image folder (metadata.jsonl or captions), parquet/jsonl file or "
                                            "a folder of them", group=DATA)
    dataset_name: Optional[str] = setting(None, "a downloaded dataset folder (same formats as train_data_dir)",
                                          group=DATA)
    instance_data_dir: Optional[str] = setting(
        None, "DreamBooth: a folder of the subject's images, each captioned instance_prompt (a folder with "
        "metadata.jsonl, parquet or a CSV keeps its own captions)", group=DATA)
    instance_prompt: Optional[str] = setting(None, "DreamBooth: the caption of every instance image, e.g. "
                                             "'a photo of sks dog'", group=DATA)
    repeats: int = setting(1, "repeat the training samples this many times per epoch (before shuffling)",
                           at_least=1, group=DATA)
    with_prior_preservation: bool = setting(
        False, "DreamBooth prior preservation: every batch adds as many class images (class_data_dir, generated "
        "from the base model where missing) and the loss adds prior_loss_weight x their loss", group=DATA)
    class_data_dir: Optional[str] = setting(None, "prior preservation: the class images' folder (filled up to "
                                            "num_class_images)", group=DATA)
    class_prompt: Optional[str] = setting(None, "prior preservation: the class images' prompt and caption, e.g. "
                                          "'a photo of a dog'", group=DATA)
    num_class_images: int = setting(100, "prior preservation: class images to have", at_least=1, group=DATA)
    prior_loss_weight: float = setting(1.0, "prior preservation: weight of the class images' loss", at_least=0,
                                       group=DATA)
    sample_batch_size: int = setting(4, "prior preservation: images per sampler call when generating class "
                                     "images", at_least=1, group=DATA)
    train_text_encoder_ti: bool = setting(
        False, "add new tokens for token_abstraction to every tokenizer and train their embeddings (only those "
        "rows) with the method's weights until train_text_encoder_ti_frac of the steps", group=PIVOTAL)
    token_abstraction: str = setting("TOK", "the word(s) prompts and captions use for the subject, comma-separated; "
                                     "each becomes its new tokens <s0><s1>... before tokenizing", group=PIVOTAL)
    num_new_tokens_per_abstraction: int = setting(2, "new tokens per abstraction", at_least=1, group=PIVOTAL)
    train_text_encoder_ti_frac: float = setting(0.5, "fraction of the steps the embeddings train for; after it "
                                                "only the method's weights do", at_least=0, group=PIVOTAL)
    train_text_encoder: bool = setting(
        False, "method lora: LoRA on the text encoders' attention projections too (q/k/v/out_proj; both SDXL "
        "encoders), same rank; not with train_text_encoder_ti", group=PIVOTAL)
    train_text_encoder_frac: float = setting(1.0, "fraction of the steps the text-encoder LoRA trains for",
                                             at_least=0, group=PIVOTAL)
    text_encoder_lr: Optional[float] = setting(None, "learning rate of what trains on the text side (new embeddings "
                                               "or text-encoder LoRA), on the same schedule (none: learning_rate; "
                                               "scale_lr scales both)", above=0, group=PIVOTAL)
    adam_weight_decay_text_encoder: Optional[float] = setting(None, "weight decay of what trains on the text side "
                                                              "(none: adam_weight_decay)", at_least=0, group=PIVOTAL)
    image_column: str = setting("image", "column holding the images", group=DATA)
    caption_column: str = setting("text", "column holding the captions", group=DATA)
    resolution: int = setting(512, "training image side in pixels (a multiple of 8)", group=DATA)
    center_crop: bool = setting(False, "crop the centre instead of a random crop", group=DATA)
    random_flip: bool = setting(False, "flip half of the images horizontally", group=DATA)
    # one decodes ~100 samples/s of 512² photos; two leave headroom (scripts/bench_loader.py)
    dataloader_num_workers: int = setting(2, "loader processes per card", at_least=1, group=DATA)
    max_train_samples: Optional[int] = setting(
        None, "train on this many samples only (debugging): the first N of the records shuffled with the seed, "
        "chosen before the data is split between cards (none: all)", at_least=1, group=DATA)
    on_bad_sample: str = setting("skip", "an unreadable image or empty caption: warn and skip it, or stop",
                                 choices=("skip", "error"), group=DATA)

    train_batch_size: int = setting(1, "images per card per micro-step", at_least=1, group=OPTIM)
    max_train_steps: Optional[int] = setting(
        None, "optimizer steps to train (none: num_train_epochs x optimizer steps per epoch when num_train_epochs is "
        f"given, else {DEFAULT_MAX_TRAIN_STEPS}; given with num_train_epochs, this wins)", at_least=1, group=OPTIM)
    num_train_epochs: Optional[int] = setting(
        None, "passes over the data when max_train_steps is not given: steps = epochs x ceil(batches per card per "
        "epoch / gradient_accumulation_steps), batches per card = samples // (train_batch_size x cards)",
        at_least=1, group=OPTIM)
    gradient_accumulation_steps: int = setting(1, "micro-steps per optimizer step", at_least=1, group=OPTIM)
    optimizer: str = setting("adamw", "the optimizer", choices=_optimizer_names, group=OPTIM)
    learning_rate: float = setting(1e-4, "peak learning rate", above=0, group=OPTIM)
    scale_lr: bool = setting(False, "multiply learning_rate by train_batch_size x gradient_accumulation_steps x cards "
                             "(the effective rate is logged)", group=OPTIM)
    lr_scheduler: str = setting("constant", "learning-rate schedule (diffusers' names)", choices=LR_SCHEDULERS,
                                group=OPTIM)
    lr_warmup_steps: int = setting(0, "steps of linear warm-up", at_least=0, group=OPTIM)
    # The adam_* settings are Prodigy's too, as in diffusers' scripts.
    adam_beta1: float = setting(0.9, "first-moment decay (AdamW, Prodigy)", at_least=0, below=1, group=OPTIM,
                                section="adamw", key="beta1")
    adam_beta2: float = setting(0.999, "second-moment decay (AdamW, Prodigy)", at_least=0, below=1, group=OPTIM,
                                section="adamw", key="beta2")
    adam_epsilon: float = setting(1e-8, "epsilon (AdamW, Prodigy)", at_least=0, group=OPTIM, section="adamw",
                                  key="epsilon")
    adam_weight_decay: float = setting(1e-2, "weight decay (AdamW: decoupled; Prodigy: see prodigy_decouple)",
                                       at_least=0, group=OPTIM, section="adamw", key="weight_decay")
    prodigy_beta3: Optional[float] = setting(None, "decay of Prodigy's running sums for d (none: sqrt(adam_beta2))",
                                             at_least=0, below=1, group=OPTIM, section="prodigy", key="beta3")
    prodigy_decouple: bool = setting(True, "Prodigy: decoupled (AdamW-style) weight decay; false: L2 added to the "
                                     "gradient", group=OPTIM, section="prodigy", key="decouple")
    prodigy_use_bias_correction: bool = setting(False, "Prodigy: Adam's bias correction", group=OPTIM,
                                                section="prodigy", key="use_bias_correction")
    prodigy_safeguard_warmup: bool = setting(False, "Prodigy: leave the lr out of d's denominator (for warm-up)",
                                             group=OPTIM, section="prodigy", key="safeguard_warmup")
    prodigy_d0: float = setting(1e-6, "Prodigy's initial d (step size) estimate", above=0, group=OPTIM,
                                section="prodigy", key="d0")
    prodigy_d_coef: float = setting(1.0, "Prodigy: scales the d estimate (the knob to turn: 0.5 smaller, 2 larger)",
                                    above=0, group=OPTIM, section="prodigy", key="d_coef")
    prodigy_growth_rate: float = setting(math.inf, "Prodigy: d grows at most this factor per step (inf: no limit)",
                                         at_least=1, may_be_inf=True, group=OPTIM, section="prodigy",
                                         key="growth_rate")
    max_grad_norm: Optional[float] = setting(1.0, "clip gradients to this global norm (none: no clipping)", above=0,
                                             group=OPTIM)
    snr_gamma: Optional[float] = setting(None, "Min-SNR loss weighting gamma (5.0 is usual; none: plain MSE)",
                                         above=0, group=OPTIM)
    noise_offset: float = setting(0.0, "noise offset (0.05-0.1 darkens/brightens better)", at_least=0, group=OPTIM)
    do_edm_style_training: bool = setting(False, "EDM-style training (Karras et al. 2022): noise at the schedule's "
                                          "sigmas, preconditioned input and output, loss on the denoised latents; "
                                          "always on for a model folder with an EDM scheduler", group=OPTIM)
    prediction_type: Optional[str] = setting(None, "training target (none: the model's scheduler config)",
                                             choices=("epsilon", "v_prediction"), group=OPTIM)
    max_nonfinite_steps: int = setting(20, "stop (exit 1) after this many non-finite steps in a row", at_least=1,
                                       group=OPTIM)

    use_ema: bool = setting(False, "keep an exponential moving average of the trained weights, updated every step "
                            "the optimizer applies; the final weights are the average, the raw ones go to "
                            "output_dir/raw", group=EMA)
    ema_decay: float = setting(0.9999, "the average's largest decay", at_least=0, below=1, group=EMA, section="ema",
                               key="decay")
    ema_min_decay: float = setting(0.0, "the average's smallest decay (after update_after_step)", at_least=0,
                                   below=1, group=EMA, section="ema", key="min_decay")
    ema_update_after_step: int = setting(0, "the average copies the weights (decay 0) for this many steps first",
                                         at_least=0, group=EMA, section="ema", key="update_after_step")
    ema_use_warmup: bool = setting(False, "decay 1 - (1 + k / ema_inv_gamma)^-ema_power at step k after "
                                   "update_after_step; false: (1 + k) / (10 + k)", group=EMA, section="ema",
                                   key="use_warmup")
    ema_inv_gamma: float = setting(1.0, "warm-up's inverse multiplicative factor", above=0, group=EMA,
                                   section="ema", key="inv_gamma")
    ema_power: float = setting(2 / 3, "warm-up's exponent (2/3 for long runs, 3/4 for short ones)", above=0,
                               group=EMA, section="ema", key="power")

    rank: int = setting(4, "LoRA rank", at_least=1, group=LORA, section="lora")
    lora_alpha: Optional[float] = setting(None, "LoRA alpha (none: the rank)", above=0, group=LORA, section="lora",
                                          key="alpha")
    lora_target_modules: List[str] = setting(
        help="layer names to adapt (to_q, to_k, to_v, to_out.0; ff.net.0.proj, ff.net.2 for feed-forward)",
        group=LORA, section="lora", key="target_modules",
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    use_dora: bool = setting(False, "DoRA: LoRA plus a learned magnitude per output", group=LORA, section="lora")

    down_ratio: float = setting(1.0, "tuner hidden width / skip channels", above=0, group=TUNER, section="scedit")

    control_type: str = setting("canny", "a built-in annotator (canny, color, grayscale, inpainting), or the name of "
                                "the dataset-supplied condition", group=CONTROL, section="control", key="type")
    conditioning_image_column: Optional[str] = setting(None, "dataset column holding the condition images",
                                                       group=CONTROL, section="control")
    dense_hint_kernel: int = setting(3, "kernel of the per-skip hint convolutions", choices=(1, 3), group=CONTROL,
                                     section="control")
    canny_low_threshold: int = setting(100, "canny annotator's low threshold", at_least=0, group=CONTROL,
                                       section="control")
    canny_high_threshold: int = setting(200, "canny annotator's high threshold", at_least=0, group=CONTROL,
                                        section="control")

    device_target: str = setting("auto", "auto: Ascend when MindSpore can use it, else CPU",
                                 choices=("auto", "CPU", "Ascend"), group=DEVICE)
    jit_level: str = setting("O0", "graph compile level (O2: Ascend only)", choices=JIT_LEVELS, group=DEVICE)
    mixed_precision: str = setting("no", "compute dtype (no: fp32); fp16 with loss scaling, bf16 on Ascend",
                                   choices=MIXED_PRECISIONS, group=DEVICE)
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, slower",
                                           group=DEVICE)
    distributed: bool = setting(False, "data-parallel over the cards msrun launched", group=DEVICE)
    compile_cache_dir: str = setting(
        help="compiled train steps are kept here and reused by later runs of the same setup (\"\": off)",
        group=DEVICE, default_factory=_default_compile_cache)

    checkpointing_steps: int = setting(500, "save a resumable checkpoint every this many steps", at_least=1,
                                       group=OUTPUT)
    checkpoints_total_limit: Optional[int] = setting(None, "keep only the newest this many checkpoints", at_least=1,
                                                     group=OUTPUT)
    resume_from_checkpoint: Optional[str] = setting(None, "a checkpoint folder, or latest", group=OUTPUT)
    logging_steps: int = setting(1, "log loss, lr, s/step and img/s every this many steps", at_least=1,
                                 group=OUTPUT)
    report_to: str = setting("none", "also write the logged values (and validation images) as TensorBoard events "
                             "(needs tensorboardX: pip install mindscedit[tensorboard])",
                             choices=("none", "tensorboard"), group=OUTPUT)
    logging_dir: Optional[str] = setting(None, "folder of the TensorBoard events (none: output_dir/logs)",
                                         group=OUTPUT)

    validation_prompt: List[str] = setting(help="prompt sampled every validation_steps on rank 0 (repeatable)",
                                           group=VALIDATION, default_factory=list)
    validation_steps: int = setting(100, "sample the validation prompts (and compute the held-out loss) every this "
                                    "many steps", at_least=1, group=VALIDATION)
    num_validation_images: int = setting(4, "images per validation prompt", at_least=1, group=VALIDATION)
    validation_image: List[str] = setting(
        help="scedit_control: the condition image of the validation prompts, one for all or one per prompt "
             "(an edge map for canny: `mindscedit annotate` makes one; repeatable)",
        group=VALIDATION, default_factory=list)
    validation_use_ema: bool = setting(False, "validate (images and held-out loss) with the EMA weights (needs "
                                       "use_ema)", group=VALIDATION)
    validation_loss_samples: Optional[int] = setting(
        None, "hold out this many samples (chosen with the seed before max_train_samples, never trained on) and log "
        "their loss, with fixed noise and timesteps, every validation_steps and at the end (none: no held-out loss)",
        at_least=1, group=VALIDATION)

    @property
    def data_source(self) -> str:
        return self.train_data_dir or self.dataset_name or self.instance_data_dir

    @property
    def tensorboard_dir(self) -> str:
        return self.logging_dir or os.path.join(self.output_dir, "logs")


FIELDS = {f.name: f for f in fields(TrainConfig)}
# List keys whose items may contain commas (prompts, paths): a string is one item, a flag repeats.
WHOLE_ITEM_LISTS = ("validation_prompt", "validation_image")
# YAML section -> {key in the section: field}
SECTIONS = {}
for _f in fields(TrainConfig):
    if _f.metadata["section"]:
        SECTIONS.setdefault(_f.metadata["section"], {})[_f.metadata["key"] or _f.name] = _f.name


def choices_of(name: str) -> Optional[tuple]:
    choices = FIELDS[name].metadata["choices"]
    return tuple(choices()) if callable(choices) else choices


def _suggest(key: str, known=None) -> str:
    close = difflib.get_close_matches(key, list(known or FIELDS), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field_kind(key: str):
    """(base type, optional?) of a field: Optional[float] -> (float, True), List[str] -> (list, False)."""
    annotation = FIELDS[key].type
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) is typing.Union and len(args) == 1
    if optional:
        annotation = args[0]
    if typing.get_origin(annotation) in (list, List):
        return list, optional
    return annotation, optional


KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "a list"}


def _coerce(key: str, value, where: str):
    """Convert a YAML/flag value to the field's type, or fail naming the key."""
    kind, optional = _field_kind(key)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UserError(f"{where}: '{key}' cannot be empty")
    try:
        if kind is list:
            if isinstance(value, str):
                value = [value] if key in WHOLE_ITEM_LISTS else [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return [str(v) for v in value]
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise TypeError
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: '{key}' must be {KIND_NAMES[kind]}, got {value!r}") from None


def read_config_file(path: str) -> dict:
    """The file's keys as field names: sections (`lora: {rank: 8}`) flattened to their fields."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r}); "
                            "save it as UTF-8") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of keys to values")
    values = {}
    for key, value in loaded.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if sub_key not in SECTIONS[key]:
                    raise UserError(f"{path}: unknown key '{sub_key}' in section '{key}' (known: "
                                    f"{', '.join(SECTIONS[key])}){_suggest(sub_key, SECTIONS[key])}")
                name = SECTIONS[key][sub_key]
                if name in values:
                    raise UserError(f"{path}: '{key}.{sub_key}' and '{name}' both set")
                values[name] = _coerce(name, sub_value, f"{path}: {key}")
            continue
        if key not in FIELDS:
            raise UserError(f"{path}: unknown key '{key}'{_suggest(key, list(FIELDS) + list(SECTIONS))}")
        if key in values:
            raise UserError(f"{path}: '{key}' set both in a section and at the top")
        values[key] = _coerce(key, value, path)
    return values


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> TrainConfig:
    """YAML file, then overrides (flags) on top; validated."""
    values = read_config_file(path) if path else {}
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            raise UserError(f"unknown flag --{key}{_suggest(key)}")
        values[key] = _coerce(key, value, f"--{key}")
    config = TrainConfig(**values)
    validate(config)
    return config


def _check(condition: bool, message: str):
    if not condition:
        raise UserError(message)


def _check_declared(config: TrainConfig) -> None:
    """Choices and bounds, as each field declares them."""
    for f in fields(TrainConfig):
        value, meta = getattr(config, f.name), f.metadata
        if value is None:
            continue
        choices = choices_of(f.name)
        if choices is not None and isinstance(value, str):
            _check(value in choices, f"{f.name}: '{value}' is not one of {', '.join(choices)}")
        elif choices is not None:
            _check(value in choices, f"{f.name} must be {' or '.join(map(str, choices))}, got {value}")
        if meta["at_least"] is not None:
            _check(value >= meta["at_least"], f"{f.name} must be >= {meta['at_least']}, got {value}")
        if meta["above"] is not None:
            _check(value > meta["above"], f"{f.name} must be > {meta['above']}, got {value}")
        if meta["below"] is not None:
            _check(value < meta["below"], f"{f.name} must be < {meta['below']}, got {value}")
        if isinstance(value, float) and not math.isfinite(value):
            _check(meta["may_be_inf"] and value == math.inf,
                   f"{f.name} must be a finite number, got {value}" if not meta["may_be_inf"]
                   else f"{f.name} must be a number or inf, got {value}")


def validate(config: TrainConfig, device_target: Optional[str] = None) -> None:
    from .methods import method_class
    from .optimizers import check_optimizer_settings

    _check_declared(config)
    _check(config.pretrained_model_name_or_path is not None, "pretrained_model_name_or_path is required")
    sources = [name for name in ("train_data_dir", "dataset_name", "instance_data_dir") if getattr(config, name)]
    _check(len(sources) == 1, "one of train_data_dir, dataset_name or instance_data_dir is required" if not sources
           else f"give one data source, not {' and '.join(sources)}")
    _check(not config.instance_data_dir or bool(config.instance_prompt and config.instance_prompt.strip()),
           "instance_data_dir needs instance_prompt (the caption of every instance image)")
    if config.with_prior_preservation:
        _check(bool(config.class_data_dir), "with_prior_preservation needs class_data_dir (the class images' folder)")
        _check(bool(config.class_prompt and config.class_prompt.strip()),
               "with_prior_preservation needs class_prompt (e.g. 'a photo of a dog')")
        # The held-out forward takes one sample at a time; a batch of one has no class half to split off.
        _check(config.validation_loss_samples is None,
               "validation_loss_samples is not available with with_prior_preservation")
    _check_pivotal_tuning(config)
    _check(config.resolution > 0 and config.resolution % 8 == 0,
           f"resolution must be a positive multiple of 8, got {config.resolution}")
    _check(all(p.strip() for p in config.validation_prompt), "validation_prompt: a prompt is empty")
    _check(not (config.do_edm_style_training and config.snr_gamma is not None),
           "snr_gamma: Min-SNR weighting is not defined for EDM-style training (do_edm_style_training); unset one")
    _check(config.ema_min_decay <= config.ema_decay,
           f"ema_min_decay ({config.ema_min_decay}) is above ema_decay ({config.ema_decay})")
    _check(config.use_ema or not config.validation_use_ema, "validation_use_ema needs use_ema")
    method_class(config.method).check(config)
    check_optimizer_settings(config)
    if device_target == "CPU":
        _check(config.jit_level != "O2", "jit_level O2 needs an Ascend device; use O0 or O1 on CPU")
        _check(config.mixed_precision != "bf16", BF16_ON_CPU)


def _check_pivotal_tuning(config: TrainConfig) -> None:
    """What trains on the text side: pivotal tuning's new embeddings or text-encoder LoRA, not both (as in
    diffusers' advanced scripts), at text_encoder_lr."""
    _check(not (config.train_text_encoder_ti and config.train_text_encoder),
           "train_text_encoder_ti and train_text_encoder: choose one (pivotal tuning trains new token embeddings, "
           "train_text_encoder LoRA on the encoders)")
    if not (config.train_text_encoder_ti or config.train_text_encoder):
        for name in ("text_encoder_lr", "adam_weight_decay_text_encoder"):
            _check(getattr(config, name) is None, f"{name} applies to the text side: set train_text_encoder_ti "
                   "(pivotal tuning) or train_text_encoder (text-encoder LoRA) too")
    for name in ("train_text_encoder_ti_frac", "train_text_encoder_frac"):
        _check(getattr(config, name) <= 1, f"{name} must be <= 1, got {getattr(config, name)}")
    if config.train_text_encoder_ti:
        words = [w.strip() for w in config.token_abstraction.split(",")]
        _check(all(words) and all(" " not in w for w in words),
               f"token_abstraction: '{config.token_abstraction}' must be words without spaces, comma-separated")


def _help_text(f) -> str:
    meta = f.metadata
    parts = [meta["help"]]
    if meta["at_least"] is not None:
        parts.append(f">= {meta['at_least']:g}")
    if meta["above"] is not None:
        parts.append(f"> {meta['above']:g}")
    if meta["below"] is not None:
        parts.append(f"< {meta['below']:g}")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        parts.append(f"default: {str(default).lower()}")
    elif isinstance(default, float):
        parts.append(f"default: {default:g}")
    elif default not in (None, [], ""):
        parts.append(f"default: {','.join(default) if isinstance(default, list) else default}")
    if meta["section"]:
        parts.append(f"YAML: {meta['section']}.{meta['key'] or f.name}")
    return "; ".join(parts).replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per config key, under its group; values stay strings here and are typed by load_config."""
    groups = {}
    for f in fields(TrainConfig):
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        group, kind = groups[group_name], _field_kind(f.name)[0]
        metavar = "{" + ",".join(map(str, choices_of(f.name))) + "}" if choices_of(f.name) else kind.__name__.upper()
        if f.name in WHOLE_ITEM_LISTS:  # repeatable: --validation_prompt "a, b" --validation_prompt "c"
            group.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, metavar="TEXT",
                               action="append", help=_help_text(f))
        elif kind is bool:  # given bare (--center_crop) it is true, as in diffusers' scripts
            group.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, metavar="{true,false}",
                               nargs="?", const="true", help=_help_text(f))
        else:  # a value is required: a bare --output_dir is an error, not a folder named "true"
            group.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                               help=_help_text(f))


def to_dict(config: TrainConfig) -> dict:
    """The settings as JSON can hold them: an infinite number as "inf" (which load_config reads back)."""
    return {key: "inf" if value == math.inf else value for key, value in dataclasses.asdict(config).items()}
