"""Put trained weights onto a UNet for sampling: SC-Tuners (ms-swift layout) and LoRA files (whose
text-encoder parts go onto the text encoders).

LoRA goes in first: its keys name the UNet's own module paths, which SC-Tuner injection
wraps. Both strengths (tuner_scale, LoRA weight) are Parameters: changing them needs no new graph.
"""
import os
from typing import Dict, List, Optional, Sequence

from ..errors import UserError
from ..tuners.csc_tuner import ControlledUNet, build_csc_tuner, load_csc_tuner_weights, read_csc_tuner_file
from ..tuners.lora import adapter_names, add_lora, read_lora_file, set_adapters
from ..tuners.sc_tuner import SCTunerConfig, inject_sc_tuners, load_sc_tuners, set_tuner_scale
from ..tuners.sc_tuner.io import read_sc_tuner_file, sc_tuner_file


def set_lora_scale(unet, scale: float, text_encoders: Optional[Dict[str, object]] = None) -> None:
    """Strength of every LoRA adapter on `unet` (and the text encoders): s = scale * alpha / rank; 0 is the
    base model."""
    for network in [unet, *(text_encoders or {}).values()]:
        names = adapter_names(network)
        if names:
            set_adapters(network, names, scale)


def apply_loras(unet, paths: Sequence[str], scale: float = 1.0,
                text_encoders: Optional[Dict[str, object]] = None) -> List[str]:
    """Add each LoRA file as adapter lora0, lora1, ... (rank, alpha, layers from the file), all active at `scale`:
    its UNet part on `unet`, its text-encoder parts on `text_encoders` ({component: encoder})."""
    text_encoders = text_encoders or {}
    names = []
    for i, path in enumerate(paths):
        if not os.path.exists(path):
            raise UserError(f"--lora: LoRA weights not found: {path}")
        names.append(f"lora{i}")
        modules = read_lora_file(path)[0]  # read once, each component's part put on its network
        on_text = sorted({m.split(".", 1)[0] for m in modules} & set(text_encoders))
        add_lora(unet, path, names[-1], weight=scale, loaded_elsewhere=on_text, modules=modules)
        for component in on_text:
            add_lora(text_encoders[component], path, names[-1], weight=scale, component=component, modules=modules)
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
