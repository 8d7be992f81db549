"""Save and load UNet LoRA weights: diffusers/peft layout (default) or kohya (see formats.py).

save_lora   writes one adapter of a UNet;
load_lora   fills an adapter already injected (the training/resume path);
add_lora    injects a new adapter shaped after a file (rank, alpha and DoRA per module) and fills it.
Loading checks every key and shape against the UNet first; nothing is half-applied.
"""
import json
import logging
import os
from typing import Dict, Tuple

import numpy as np
import mindspore as ms
from safetensors import safe_open
from safetensors.numpy import save_file

from ...errors import UserError
from ..weights_file import read_weights
from . import formats
from .config import LoRAConfig
from .formats import DIFFUSERS_WEIGHTS_NAME, LoraModule
from .model import adapter_names, inject_modules, lora_layers, lora_modules, refresh_graph

WEIGHTS_NAME = DIFFUSERS_WEIGHTS_NAME
KOHYA_WEIGHTS_NAME = "lora_kohya.safetensors"
logger = logging.getLogger(__name__)


def lora_file(path: str) -> str:
    """The weights file of `path`: the file itself, or the LoRA file in a folder."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in (WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(found) == 1:
            return os.path.join(path, found[0])
    raise UserError(f"LoRA weights not found: {path} (expected {WEIGHTS_NAME} or one .safetensors file)")


def read_lora_file(path: str) -> Tuple[Dict[str, LoraModule], str]:
    """({module: LoraModule}, layout) of a LoRA file in any supported layout."""
    file = lora_file(path)
    state, meta = read_weights(file)
    config = json.loads(meta[formats.METADATA_KEY]) if meta.get(formats.METADATA_KEY) else None
    try:
        return formats.read_state(state, config)
    except UserError as err:
        raise UserError(f"{file}: {err}") from None


def write_lora_file(modules: Dict[str, LoraModule], path: str, layout: str = "diffusers") -> str:
    """Write `modules` to `path` (a folder gets the layout's standard file name); returns the file."""
    if path.endswith(".safetensors"):
        file = path
    else:
        file = os.path.join(path, WEIGHTS_NAME if layout == "diffusers" else KOHYA_WEIGHTS_NAME)
    state, metadata = formats.write_state(modules, layout)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    save_file(state, file, metadata=metadata)
    return file


def save_lora(unet, folder: str, config: LoRAConfig, layout: str = "diffusers") -> str:
    """Write adapter `config.adapter_name` of `unet`; `layout` is diffusers or kohya."""
    return write_lora_file(lora_modules(unet, config.adapter_name), folder, layout)


def read_lora_metadata(file: str) -> dict:
    """The UNet's LoraConfig fields (r, lora_alpha, target_modules, use_dora, ...) from a diffusers file."""
    with safe_open(lora_file(file), framework="np") as f:
        meta = f.metadata() or {}
    config = json.loads(meta.get(formats.METADATA_KEY, "{}"))
    return formats._metadata_config(config, "unet")


def _unet_modules(modules: Dict[str, LoraModule], file: str) -> Dict[str, LoraModule]:
    """The UNet part of a file ({path: module}); other components are reported and skipped."""
    others = sorted({m.split(".", 1)[0] for m in modules} - {"unet"})
    if others:
        logger.warning("%s: skipping LoRA weights of %s (only the UNet is loaded)", file, ", ".join(others))
    unet_part = {m.split(".", 1)[1]: v for m, v in modules.items() if m.startswith("unet.")}
    if not unet_part:
        raise UserError(f"{file}: no UNet LoRA weights in this file")
    return unet_part


def _check_against_dense(unet, modules: Dict[str, LoraModule], file: str) -> None:
    """Every module must be a Dense of this UNet with matching in/out sizes."""
    from mindspore import nn

    from .layer import LoraLinear

    cells = dict(unet.cells_and_names())
    for path, m in modules.items():
        cell = cells.get(path)
        if isinstance(cell, LoraLinear):
            cell = cell.get_base_layer()
        if not isinstance(cell, nn.Dense):
            raise UserError(f"{file}: key 'unet.{path}.lora_A.weight' does not fit this UNet (no Dense layer '{path}')")
        expected_a = (m.rank, cell.in_channels)
        if tuple(m.down.shape) != expected_a:
            raise UserError(f"{file}: 'unet.{path}.lora_A.weight' has shape {tuple(m.down.shape)}, "
                            f"this UNet expects {expected_a}")
        if tuple(m.up.shape) != (cell.out_channels, m.rank):
            raise UserError(f"{file}: 'unet.{path}.lora_B.weight' has shape {tuple(m.up.shape)}, "
                            f"this UNet expects {(cell.out_channels, m.rank)}")
        if m.magnitude is not None and tuple(m.magnitude.shape) != (cell.out_channels,):
            raise UserError(f"{file}: 'unet.{path}.lora_magnitude_vector' has shape {tuple(m.magnitude.shape)}, "
                            f"this UNet expects {(cell.out_channels,)}")


def _assign(unet, modules: Dict[str, LoraModule], adapter_name: str) -> None:
    layers = lora_layers(unet)
    for path, m in modules.items():
        layer = layers[path]
        layer.lora_A[adapter_name].weight.set_data(ms.Tensor(m.down.astype(np.float32)))
        layer.lora_B[adapter_name].weight.set_data(ms.Tensor(m.up.astype(np.float32)))
        if m.magnitude is not None:
            layer.lora_magnitude_vector[adapter_name].weight.set_data(ms.Tensor(m.magnitude.astype(np.float32)))
        layer.set_alpha(adapter_name, m.alpha)


def load_lora(unet, path: str, adapter_name: str = "default") -> None:
    """Load a LoRA file (diffusers or kohya layout) into adapter `adapter_name`, already injected in `unet`."""
    file = lora_file(path)
    modules = _unet_modules(read_lora_file(file)[0], file)
    layers = {p: l for p, l in lora_layers(unet).items() if adapter_name in l.adapter_order}
    if not layers:
        raise ValueError(f"this UNet has no LoRA adapter named '{adapter_name}'")
    for p, m in modules.items():
        if p not in layers:
            raise UserError(f"{file}: key 'unet.{p}.lora_A.weight' does not fit this UNet's LoRA layers")
        layer = layers[p]
        expected = {
            "lora_A.weight": (tuple(layer.lora_A[adapter_name].weight.shape), m.down.shape),
            "lora_B.weight": (tuple(layer.lora_B[adapter_name].weight.shape), m.up.shape),
        }
        if adapter_name in layer.dora_adapters:
            if m.magnitude is None:
                raise UserError(f"{file}: missing key 'unet.{p}.lora_magnitude_vector' (this adapter is DoRA)")
            expected["lora_magnitude_vector"] = ((layer.out_features,), m.magnitude.shape)
        elif m.magnitude is not None:
            raise UserError(f"{file}: 'unet.{p}' is DoRA but this UNet's adapter '{adapter_name}' is plain LoRA")
        for kind, (want, got) in expected.items():
            if tuple(got) != tuple(want):
                raise UserError(f"{file}: 'unet.{p}.{kind}' has shape {tuple(got)}, this UNet expects {tuple(want)}")
    missing = sorted(set(layers) - set(modules))
    if missing:
        raise UserError(f"{file}: missing key 'unet.{missing[0]}.lora_A.weight' ({len(missing)} modules missing)")
    _assign(unet, modules, adapter_name)


def add_lora(unet, path: str, adapter_name: str = "default", weight: float = 1.0) -> None:
    """Inject a new adapter shaped after a LoRA file (any layout) and load it; active with `weight`."""
    file = lora_file(path)
    modules = _unet_modules(read_lora_file(file)[0], file)
    add_lora_modules(unet, modules, adapter_name, file)
    if weight != 1.0:
        for layer in lora_layers(unet).values():
            if adapter_name in layer.adapter_order:
                layer.set_weight(adapter_name, weight)


def add_lora_modules(unet, modules: Dict[str, LoraModule], adapter_name: str, source: str = "weights") -> None:
    """Inject adapter `adapter_name` from {UNet path: LoraModule}; checked whole before anything changes."""
    if adapter_name in adapter_names(unet):
        raise UserError(f"this UNet already has a LoRA adapter named '{adapter_name}'")
    _check_against_dense(unet, modules, source)
    shapes = {p: (m.rank, m.alpha, m.magnitude is not None) for p, m in modules.items()}
    inject_modules(unet, shapes, adapter_name)
    _assign(unet, modules, adapter_name)
    refresh_graph(unet)


def combine_adapters(unet, names, weights, new_name: str, mode: str = "cat") -> None:
    """Add adapter `new_name` = the combination of adapters `names` (see formats.combine for cat / linear)."""
    combined = formats.combine([lora_modules(unet, n) for n in names], list(weights), mode)
    add_lora_modules(unet, {m.split(".", 1)[1]: v for m, v in combined.items()}, new_name)
