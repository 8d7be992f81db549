"""Text-to-image sampling with mindone's schedulers, for trained SC-Tuners, LoRA or plain UNets.

Names load on first use: the CLI builds its parser from `sampling.command` without importing
the models (seconds of imports, and mindone's import-time notices on stdout, for every command).
"""
import importlib

_EXPORTS = {
    "apply_csc_tuners": "adapters", "apply_loras": "adapters", "apply_sc_tuners": "adapters",
    "set_lora_scale": "adapters", "image_grid": "images", "save_images": "images", "slug": "images",
    "Sampler": "sampler", "SCHEDULERS": "schedulers", "make_scheduler": "schedulers", "schedulers_for": "schedulers",
    "Validator": "validation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
