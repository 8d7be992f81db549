"""Model folders, families, presets and the UNet's graph-level rewrites.

Names are imported on first use, so `mindscedit.models.text` (prompt tokenization, used by the
data loader) does not pull MindSpore into processes that only read data.
"""
import importlib

_EXPORTS = {
    "PipelineComponents": "loading", "build_unet": "loading",
    "check_model_folder": "loading", "load_components": "loading",
    "UNET_PRESETS": "presets", "unet_preset": "presets",
    "make_tiny_model": "tiny",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = list(_EXPORTS)
