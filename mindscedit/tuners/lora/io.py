"""Save and load UNet LoRA weights: diffusers/peft layout (default) or kohya (see formats.py).

save_lora   writes one adapter of a UNet (and of the text encoders trained beside it);
load_lora   fills an adapter already injected (the training/resume path);
add_lora    injects a new adapter shaped after a file (rank, alpha and DoRA per module) and fills it.
Loading checks every key and shape against the UNet first; nothing is half-applied.
"""
import json
import logging
import os
from typing import Dict, Optional, Tuple

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


def write_lora_file(modules: Dict[str, LoraModule], path: str, layout: str = "diffusers",
                    family: Optional[str] = None) -> str:
    """Write `modules` to `path` (a folder gets the layout's standard file name); returns the file.
    `family` ("sd" / "sdxl", None: from the module names) picks kohya's naming."""
    if path.endswith(".safetensors"):
        file = path
    else:
        file = os.path.join(path, WEIGHTS_NAME if layout == "diffusers" else KOHYA_WEIGHTS_NAME)
    state, metadata = formats.write_state(modules, layout, family)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    save_file(state, file, metadata=metadata)
    return file


def unet_family(unet) -> str:
    """"sdxl" for a UNet with SDXL's text_time conditioning (SDXL, Playground), else "sd"."""
    config = getattr(unet, "config", None)
    return "sdxl" if getattr(config, "addition_embed_type", None) == "text_time" else "sd"


def save_lora(unet, folder: str, config: LoRAConfig, layout: str = "diffusers", text_encoders=None) -> str:
    """Write adapter `config.adapter_name` of `unet` and of the text encoders in `text_encoders`
    ({component: encoder}, keys `text_encoder.` / `text_encoder_2.`); `layout` is diffusers or kohya
    (kohya's SDXL naming for an SDXL UNet, known from its config rather than guessed from the names)."""
    modules = lora_modules(unet, config.adapter_name)
    for component, encoder in (text_encoders or {}).items():
        modules.update(lora_modules(encoder, config.adapter_name, component))
    return write_lora_file(modules, folder, layout, unet_family(unet))


def read_lora_metadata(file: str) -> dict:
    """The UNet's LoraConfig fields (r, lora_alpha, target_modules, use_dora, ...) from a diffusers file."""
    with safe_open(lora_file(file), framework="np") as f:
        meta = f.metadata() or {}
    config = json.loads(meta.get(formats.METADATA_KEY, "{}"))
    return formats._metadata_config(config, "unet")


def _what(component: str) -> str:
    return "UNet" if component == "unet" else component


def _component_modules(modules: Dict[str, LoraModule], file: str, component: str = "unet",
                       loaded_elsewhere=()) -> Dict[str, LoraModule]:
    """One component's part of a file ({path: module}). For the UNet, parts of components not loaded
    elsewhere (`loaded_elsewhere`: the text encoders a caller fills too) are reported and skipped."""
    if component == "unet":
        others = sorted({m.split(".", 1)[0] for m in modules} - {"unet"} - set(loaded_elsewhere))
        if others:
            logger.warning("%s: skipping LoRA weights of %s (only the UNet is loaded)", file, ", ".join(others))
    part = {m.split(".", 1)[1]: v for m, v in modules.items() if m.startswith(component + ".")}
    if not part:
        raise UserError(f"{file}: no {_what(component)} LoRA weights in this file")
    return part


def _unet_modules(modules: Dict[str, LoraModule], file: str) -> Dict[str, LoraModule]:
    return _component_modules(modules, file)


def _check_against_dense(unet, modules: Dict[str, LoraModule], file: str, component: str = "unet") -> None:
    """Every module must be a Dense of this network with matching in/out sizes."""
    from mindspore import nn

    from .layer import LoraLinear

    what = _what(component)
    cells = dict(unet.cells_and_names())
    for path, m in modules.items():
        cell = cells.get(path)
        if isinstance(cell, LoraLinear):
            cell = cell.get_base_layer()
        if not isinstance(cell, nn.Dense):
            raise UserError(f"{file}: key '{component}.{path}.lora_A.weight' does not fit this {what} (no Dense layer "
                            f"'{path}')")
        expected_a = (m.rank, cell.in_channels)
        if tuple(m.down.shape) != expected_a:
            raise UserError(f"{file}: '{component}.{path}.lora_A.weight' has shape {tuple(m.down.shape)}, "
                            f"this {what} expects {expected_a}")
        if tuple(m.up.shape) != (cell.out_channels, m.rank):
            raise UserError(f"{file}: '{component}.{path}.lora_B.weight' has shape {tuple(m.up.shape)}, "
                            f"this {what} expects {(cell.out_channels, m.rank)}")
        if m.magnitude is not None and tuple(m.magnitude.shape) != (cell.out_channels,):
            raise UserError(f"{file}: '{component}.{path}.lora_magnitude_vector' has shape "
                            f"{tuple(m.magnitude.shape)}, this {what} expects {(cell.out_channels,)}")


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


def add_lora(unet, path: str, adapter_name: str = "default", weight: float = 1.0, component: str = "unet",
             loaded_elsewhere=(), modules: Optional[Dict[str, LoraModule]] = None) -> None:
    """Inject a new adapter shaped after a LoRA file (any layout) and load it; active with `weight`.
    component: which part of the file goes on `unet` (a text encoder's: "text_encoder", "text_encoder_2").
    modules: the file's modules when the caller has read it already (read_lora_file)."""
    file = lora_file(path)
    if modules is None:
        modules = read_lora_file(file)[0]
    add_lora_modules(unet, _component_modules(modules, file, component, loaded_elsewhere), adapter_name, file,
                     component)
    if weight != 1.0:
        for layer in lora_layers(unet).values():
            if adapter_name in layer.adapter_order:
                layer.set_weight(adapter_name, weight)


def add_lora_modules(unet, modules: Dict[str, LoraModule], adapter_name: str, source: str = "weights",
                     component: str = "unet") -> None:
    """Inject adapter `adapter_name` from {path: LoraModule}; checked whole before anything changes."""
    if adapter_name in adapter_names(unet):
        raise UserError(f"this {_what(component)} already has a LoRA adapter named '{adapter_name}'")
    _check_against_dense(unet, modules, source, component)
    shapes = {p: (m.rank, m.alpha, m.magnitude is not None) for p, m in modules.items()}
    inject_modules(unet, shapes, adapter_name)
    _assign(unet, modules, adapter_name)
    refresh_graph(unet)


def combine_adapters(unet, names, weights, new_name: str, mode: str = "cat", **options) -> None:
    """Add adapter `new_name` = the combination of adapters `names` (formats.combine: cat, linear, svd,
    ties, dare_linear, dare_ties, magnitude_prune and the *_svd variants; `options` as merge.merge_adapters)."""
    options.setdefault("names", [f"adapter '{n}'" for n in names])
    options.setdefault("same_modules", False)  # adapters of one UNet may target different layers
    combined = formats.combine([lora_modules(unet, n) for n in names], list(weights), mode, **options)
    add_lora_modules(unet, {m.split(".", 1)[1]: v for m, v in combined.items()}, new_name)


def merge_lora_files(paths, weights, out: str, combination: str = "cat", layout: str = "diffusers", **options) -> str:
    """Merge LoRA files (any layout) into one written to `out` in `layout`; returns the file written.
    `options` as merge.merge_adapters (density, majority_sign_method, rank, svd_clamp, seed)."""
    if layout not in formats.LAYOUTS:
        raise UserError(f"unknown LoRA layout '{layout}': choose one of {', '.join(formats.LAYOUTS)}")
    files = [lora_file(p) for p in paths]
    adapters = [read_lora_file(f)[0] for f in files]
    merged = formats.combine(adapters, list(weights), combination, names=files, **options)
    return write_lora_file(merged, out, layout)
