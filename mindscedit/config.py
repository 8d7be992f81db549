"""Training configuration: one dataclass, filled from a YAML file and then from command-line flags.

Flag names follow diffusers' training scripts, so a user who knows train_text_to_image.py knows
these. Every check here runs before any model is loaded, and fails with one line that names the
key or flag.
"""
import argparse
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field, fields
from typing import List, Optional

import yaml

from .errors import UserError

METHODS = ("vanilla", "lora", "scedit", "scedit_control")
JIT_LEVELS = ("O0", "O1", "O2")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _default_compile_cache() -> str:
    return os.environ.get("MINDSCEDIT_COMPILE_CACHE", os.path.join("~", ".cache", "mindscedit", "compile"))


@dataclass
class TrainConfig:
    # what to train
    method: str = "scedit"
    pretrained_model_name_or_path: Optional[str] = None
    output_dir: str = "outputs/run"
    seed: int = 0
    # data
    train_data_dir: Optional[str] = None
    dataset_name: Optional[str] = None
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    dataloader_num_workers: int = 2  # one decodes ~100 samples/s of 512² photos; two leave headroom (scripts/bench_loader.py)
    on_bad_sample: str = "skip"
    # optimisation
    train_batch_size: int = 1
    max_train_steps: int = 1000
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    adam_weight_decay: float = 1e-2
    max_grad_norm: Optional[float] = 1.0
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    prediction_type: Optional[str] = None
    max_nonfinite_steps: int = 20
    # method options
    rank: int = 4
    lora_alpha: Optional[float] = None
    lora_target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    use_dora: bool = False
    down_ratio: float = 1.0
    # controllable generation (method scedit_control)
    control_type: str = "canny"  # a built-in annotator, or the name of a dataset-supplied condition
    conditioning_image_column: Optional[str] = None  # dataset column holding condition images
    dense_hint_kernel: int = 3
    canny_low_threshold: int = 100
    canny_high_threshold: int = 200
    # runtime
    device_target: str = "auto"
    jit_level: str = "O0"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    distributed: bool = False
    # compiled train steps are kept here and reused by later runs of the same setup; "" turns it off
    compile_cache_dir: str = field(default_factory=_default_compile_cache)
    # outputs
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    logging_steps: int = 1
    # validation images (sampled from the current weights every validation_steps, on rank 0)
    validation_prompt: List[str] = field(default_factory=list)
    validation_steps: int = 100
    num_validation_images: int = 4
    # condition images of the validation prompts (scedit_control): one for all, or one per prompt,
    # each the condition itself (an edge map for canny: `mindscedit annotate` makes one)
    validation_image: List[str] = field(default_factory=list)

    @property
    def data_source(self) -> str:
        return self.train_data_dir or self.dataset_name


FIELD_TYPES = {f.name: f for f in fields(TrainConfig)}
# List keys whose items may contain commas (prompts): a string is one item, a flag repeats.
WHOLE_ITEM_LISTS = ("validation_prompt", "validation_image")


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, FIELD_TYPES, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field_kind(key: str):
    """(base type, optional?) of a field: Optional[float] -> (float, True), List[str] -> (list, False)."""
    annotation = FIELD_TYPES[key].type
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


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> TrainConfig:
    """YAML file, then overrides (flags) on top; validated."""
    values = {}
    if path:
        if not os.path.isfile(path):
            raise UserError(f"config file not found: {path}")
        with open(path) as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of keys to values")
        for key, value in loaded.items():
            if key not in FIELD_TYPES:
                raise UserError(f"{path}: unknown key '{key}'{_suggest(key)}")
            values[key] = _coerce(key, value, path)
    for key, value in (overrides or {}).items():
        if key not in FIELD_TYPES:
            raise UserError(f"unknown flag --{key}{_suggest(key)}")
        values[key] = _coerce(key, value, f"--{key}")
    config = TrainConfig(**values)
    validate(config)
    return config


def _check(condition: bool, message: str):
    if not condition:
        raise UserError(message)


def _choice(config, key, choices):
    value = getattr(config, key)
    _check(value in choices, f"{key}: '{value}' is not one of {', '.join(choices)}")


def validate(config: TrainConfig, device_target: Optional[str] = None) -> None:
    _choice(config, "method", METHODS)
    _choice(config, "jit_level", JIT_LEVELS)
    _choice(config, "mixed_precision", MIXED_PRECISIONS)
    _choice(config, "lr_scheduler", LR_SCHEDULERS)
    _choice(config, "on_bad_sample", ("skip", "error"))
    _choice(config, "device_target", ("auto", "CPU", "Ascend"))
    if config.prediction_type is not None:
        _choice(config, "prediction_type", ("epsilon", "v_prediction"))
    _check(config.pretrained_model_name_or_path is not None, "pretrained_model_name_or_path is required")
    _check(config.data_source is not None, "one of train_data_dir or dataset_name is required")
    _check(config.learning_rate > 0, f"learning_rate must be > 0, got {config.learning_rate}")
    _check(config.resolution > 0 and config.resolution % 8 == 0,
           f"resolution must be a positive multiple of 8, got {config.resolution}")
    for key in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                "logging_steps", "dataloader_num_workers", "max_nonfinite_steps", "validation_steps",
                "num_validation_images"):
        _check(getattr(config, key) >= 1, f"{key} must be >= 1, got {getattr(config, key)}")
    _check(config.lr_warmup_steps >= 0, f"lr_warmup_steps must be >= 0, got {config.lr_warmup_steps}")
    _check(config.rank >= 1, f"rank must be >= 1, got {config.rank}")
    _check(0 < config.down_ratio, f"down_ratio must be > 0, got {config.down_ratio}")
    _check(config.dense_hint_kernel in (1, 3), f"dense_hint_kernel must be 1 or 3, got {config.dense_hint_kernel}")
    if config.method == "scedit_control" and not config.conditioning_image_column:
        from .data.conditions import ANNOTATORS

        _check(config.control_type in ANNOTATORS,
               f"control_type '{config.control_type}' is not built in ({', '.join(ANNOTATORS)}); "
               "give its images with conditioning_image_column")
    _check(config.noise_offset >= 0, f"noise_offset must be >= 0, got {config.noise_offset}")
    if config.snr_gamma is not None:
        _check(config.snr_gamma > 0, f"snr_gamma must be > 0, got {config.snr_gamma}")
    if config.max_grad_norm is not None:
        _check(config.max_grad_norm > 0, f"max_grad_norm must be > 0, got {config.max_grad_norm}")
    _check(all(p.strip() for p in config.validation_prompt), "validation_prompt: a prompt is empty")
    _check_validation_images(config)
    if config.checkpoints_total_limit is not None:
        _check(config.checkpoints_total_limit >= 1,
               f"checkpoints_total_limit must be >= 1, got {config.checkpoints_total_limit}")
    if device_target == "CPU":
        _check(config.jit_level != "O2", "jit_level O2 needs an Ascend device; use O0 or O1 on CPU")
        _check(config.mixed_precision != "bf16", BF16_ON_CPU)


# fp16 runs on CPU (slowly: a check of the Ascend dtype path); bf16 does not.
BF16_ON_CPU = ("mixed_precision bf16 needs an Ascend device (MindSpore's CPU has no bf16 MatMul kernel); "
               "check a bf16 step's types on CPU with: mindscedit bench --mixed_precision bf16 --compile_only")
FP16_ON_CPU = "mixed_precision fp16 on CPU: for checking the Ascend dtype path, not for speed"


def _check_validation_images(config: TrainConfig) -> None:
    """CSC-Tuner validation samples under a condition: one image for all prompts or one each."""
    images, prompts = config.validation_image, config.validation_prompt
    if config.method != "scedit_control":
        _check(not images, f"validation_image is for method scedit_control, not {config.method}")
        return
    if not prompts:
        return
    _check(bool(images), "validation_prompt with method scedit_control needs validation_image (the condition "
                         "image to sample under; `mindscedit annotate` makes one from a photo)")
    _check(len(images) in (1, len(prompts)),
           f"validation_image: give one image, or one per validation_prompt ({len(prompts)}), got {len(images)}")
    for path in images:
        _check(os.path.isfile(path), f"validation_image not found: {path}")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per config key; values stay strings here and are typed by load_config."""
    for name in FIELD_TYPES:
        if name in WHOLE_ITEM_LISTS:  # repeatable: --validation_prompt "a, b" --validation_prompt "c"
            parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar="VALUE", action="append")
            continue
        # nargs="?" lets a boolean be given bare (--center_crop), as in diffusers' scripts.
        parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar="VALUE", nargs="?", const="true")


def check_unknown_flags(extra: List[str]) -> None:
    for arg in extra:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0]
            raise UserError(f"unknown flag --{key}{_suggest(key)}")
        raise UserError(f"unexpected argument '{arg}'")


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
