"""Put trained weights onto a UNet for sampling: SC-Tuners (ms-swift layout) and LoRA files.

LoRA goes in first: its keys name the UNet's own module paths, which SC-Tuner injection
wraps. Both strengths (tuner_scale, LoRA weight) are Parameters: changing them needs no new graph.
"""
import os
from typing import List, Sequence

from ..errors import UserError
from ..tuners.csc_tuner import ControlledUNet, build_csc_tuner, load_csc_tuner_weights, read_csc_tuner_file
from ..tuners.lora import adapter_names, add_lora, set_adapters
from ..tuners.sc_tuner import SCTunerConfig, inject_sc_tuners, load_sc_tuners, set_tuner_scale
from ..tuners.sc_tuner.io import read_sc_tuner_file, sc_tuner_file


def set_lora_scale(unet, scale: float) -> None:
    """Strength of every LoRA adapter on `unet`: s = scale * alpha / rank; 0 is the base model."""
    names = adapter_names(unet)
    if names:
        set_adapters(unet, names, scale)


def apply_loras(unet, paths: Sequence[str], scale: float = 1.0) -> List[str]:
    """Add each LoRA file as adapter lora0, lora1, ... (rank, alpha, layers from the file), all active at `scale`."""
    names = []
    for i, path in enumerate(paths):
        if not os.path.exists(path):
            raise UserError(f"--lora: LoRA weights not found: {path}")
        names.append(f"lora{i}")
        add_lora(unet, path, names[-1], weight=scale)
    return names


def apply_sc_tuners(unet, path: str, scale: float = 1.0) -> None:
    """Inject SC-Tuners sized after the weights (down_ratio from ln1's shape), load them, set their scale."""
    if not os.path.exists(path):
        raise UserError(f"--scedit: SC-Tuner weights not found: {path}")
    tuners, _, _ = read_sc_tuner_file(sc_tuner_file(path))
    hidden, dim = next(iter(tuners.values()))["ln1.weight"].shape
    inject_sc_tuners(unet, SCTunerConfig(down_ratio=hidden / dim))
    load_sc_tuners(unet, path)
    set_tuner_scale(unet, scale)


def apply_csc_tuners(unet, paths: Sequence[str]) -> ControlledUNet:
    """A ControlledUNet with one CSC-Tuner per file (built from each file's config), weights loaded."""
    tuners = {}
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"--csc_tuner: CSC-Tuner weights not found: {path}")
        condition, config, state = read_csc_tuner_file(path)
        name = condition if condition not in tuners else f"{condition}{len(tuners)}"
        tuners[name] = build_csc_tuner(unet, config)
        load_csc_tuner_weights(tuners[name], state, path)
    return ControlledUNet(unet, tuners)
