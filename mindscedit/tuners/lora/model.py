"""Put LoRA / DoRA adapters into a mindone UNet, switch them, merge them.

Layers are `LoraLinear` (mindone's peft Linear plus Parameter-held weights, see layer.py), placed
where peft would place them: every Dense whose module path equals a target or ends with
".<target>". Parameter names keep peft's layout (`<path>.lora_A.<adapter>.weight`).

MindSpore caches a Cell's compiled graph by the Cell's identity, not its structure: after adding
adapters to a UNet that has already run, `refresh_graph` makes the next call compile anew.
Adapter weights, merges and on/off switches change Parameters only and need no new graph.
"""
import time
from typing import Dict, List, Optional, Sequence, Union

import mindspore as ms
from mindspore import nn

from ...errors import UserError
from .config import LoRAConfig
from .formats import LoraModule
from .layer import LoraLinear


def refresh_graph(cell: nn.Cell) -> None:
    """Make `cell`'s next call compile a new graph (its cache key includes the creation time)."""
    object.__setattr__(cell, "_create_time", time.time_ns())


def _refresh_names(unet) -> None:
    # MindSpore needs unique Parameter names (the optimizer keys on them); new sub-cells get short ones.
    for name, param in unet.parameters_and_names():
        param.name = name


def _cells(unet) -> Dict[str, nn.Cell]:
    return dict(unet.cells_and_names())


def _matches(path: str, targets: Sequence[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def lora_layers(unet) -> Dict[str, LoraLinear]:
    """{module path: layer} of every LoRA layer in `unet`."""
    return {name: cell for name, cell in unet.cells_and_names() if isinstance(cell, LoraLinear)}


def adapter_names(unet) -> List[str]:
    names = []
    for layer in lora_layers(unet).values():
        names += [a for a in layer.adapter_order if a not in names]
    return names


def _add(unet, cells, path: str, adapter_name: str, rank: int, alpha: float, use_dora: bool) -> LoraLinear:
    layer = cells[path]
    if isinstance(layer, LoraLinear):
        layer.add_adapter(adapter_name, rank, alpha, use_dora)
        return layer
    if not isinstance(layer, nn.Dense):
        raise UserError(f"'{path}' is a {type(layer).__name__}, LoRA here needs a Dense layer")
    new = LoraLinear(layer, adapter_name, rank, alpha, use_dora)
    parent_path, _, child = path.rpartition(".")
    setattr(cells[parent_path] if parent_path else unet, child, new)
    return new


def _dense_paths(unet) -> Dict[str, nn.Cell]:
    """{path: layer} of the Dense layers a LoRA can sit on (already wrapped ones by their own path)."""
    found = {}
    for name, cell in unet.cells_and_names():
        if isinstance(cell, LoraLinear):
            found[name] = cell
        elif isinstance(cell, nn.Dense) and not name.endswith(".base_layer") and ".lora_" not in name:
            found[name] = cell
    return found


def inject_modules(unet, shapes: Dict[str, tuple], adapter_name: str) -> List[ms.Parameter]:
    """Add adapter `adapter_name` at the given {path: (rank, alpha, use_dora)}; returns its trainable params.

    Every path is checked before the UNet is touched.
    """
    if adapter_name in adapter_names(unet):
        raise UserError(f"this UNet already has a LoRA adapter named '{adapter_name}'")
    cells = _cells(unet)
    for path in shapes:
        if path not in cells:
            raise UserError(f"'{path}' is not a module of this UNet")
        if not isinstance(cells[path], (nn.Dense, LoraLinear)):
            raise UserError(f"'{path}' is a {type(cells[path]).__name__}, LoRA here needs a Dense layer")
    layers = [_add(unet, cells, path, adapter_name, *spec) for path, spec in shapes.items()]
    _refresh_names(unet)
    refresh_graph(unet)
    params = []
    for layer in layers:
        params += [layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight]
        if adapter_name in layer.dora_adapters:
            params.append(layer.lora_magnitude_vector[adapter_name].weight)
    return params


def inject_lora(unet, config: LoRAConfig) -> List[ms.Parameter]:
    """Add LoRA (or DoRA) adapters to `unet` in place; returns the new trainable parameters."""
    if config.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {config.rank}")
    targets = [p for p in _dense_paths(unet) if _matches(p, config.target_modules)]
    if not targets:
        raise UserError(f"no Dense layer of this UNet matches lora_target_modules {list(config.target_modules)}")
    spec = (config.rank, config.lora_alpha, config.use_dora)
    return inject_modules(unet, {p: spec for p in targets}, config.adapter_name)


def set_adapters(unet, names: Union[str, List[str]], weights: Optional[Union[float, List[float]]] = None) -> None:
    """Activate `names` with per-adapter weights (like diffusers' set_adapters); others are switched off.

    weight w scales each update: s = w * alpha / r (for DoRA inside the norm, as peft does);
    w = 0 switches the adapter off, so the layer is the base layer exactly.
    """
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0 if weights is None else weights] * len(names) if not isinstance(weights, list) else weights
    if len(weights) != len(names):
        raise UserError(f"{len(names)} adapter names but {len(weights)} weights")
    unknown = [n for n in names if n not in adapter_names(unet)]
    if unknown:
        raise UserError(f"no LoRA adapter named '{unknown[0]}' (have: {', '.join(adapter_names(unet))})")
    chosen = dict(zip(names, weights))
    for layer in lora_layers(unet).values():
        for adapter in layer.adapter_order:
            layer.set_weight(adapter, chosen.get(adapter, layer.weights[adapter]), active=adapter in chosen)


def merge_lora(unet, scale: float = 1.0, adapter_names: Optional[List[str]] = None) -> None:
    """Fold the active adapters (times `scale`) into the base weights; `unmerge_lora` undoes it."""
    for layer in lora_layers(unet).values():
        layer.merge(adapter_names=adapter_names, scale=scale)


def unmerge_lora(unet) -> None:
    for layer in lora_layers(unet).values():
        layer.unmerge()


def lora_modules(unet, adapter_name: str = "default", component: str = "unet") -> Dict[str, LoraModule]:
    """The weights of one adapter in the neutral form of formats.py (keys `unet.<path>`)."""
    modules = {}
    for path, layer in lora_layers(unet).items():
        if adapter_name in layer.adapter_order:
            down, up, magnitude = layer.arrays(adapter_name)
            modules[f"{component}.{path}"] = LoraModule(down, up, float(layer.lora_alpha[adapter_name]), magnitude)
    if not modules:
        raise UserError(f"this UNet has no LoRA adapter named '{adapter_name}'")
    return modules
