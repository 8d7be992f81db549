"""Save and load SC-Tuner weights in ms-swift's layout; read scepter's.

ms-swift (`SwiftModel.save_pretrained(dir, safe_serialization=True)` with an SCETuningConfig):
  dir/<adapter>/adapter_model.safetensors  keys `up_blocks.{i}.resnets.{j}.scetuner_<adapter>.tuner_op.ln{1,2}.{weight,bias}`
                                            (the UNet's own state-dict names, no prefix; Linear weights [out, in])
  dir/<adapter>/adapter_config.json        asdict(SCETuningConfig): swift_type ("SCETuning"), dims, target_modules,
                                            hint_modules, tuner_mode, tuner_op, down_ratio, model_key_mapping (sorted keys)
  dir/configuration.json                   "{}"
  `Swift.from_pretrained(unet, dir)` loads every such adapter folder. `save_sc_tuners` writes the
  adapter folder itself (what training outputs); `swift_root=True` writes the whole tree above.
scepter: `lsc_identity.{m}.tuner_op.ln{1,2}.{weight,bias}` (m = decoder skip index, optionally behind
  a `model.` prefix), one file (safetensors here; .pth needs torch and is not read).

Loading accepts any of these (a file, an adapter folder, or an ms-swift save directory), checks
every key and shape against the UNet first, and assigns nothing unless all fit.
"""
import json
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms
from safetensors.numpy import save_file

from ...errors import UserError
from ..weights_file import read_weights
from .config import SCTunerConfig
from .model import decoder_skip_slots, sc_tuner_dims, sc_tuner_named_parameters

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
TARGET_MODULES = r"^up_blocks\.\d+\.resnets\.\d+$"
PARAM_NAMES = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")
LAYOUTS = ("swift", "scepter")

_SWIFT_KEY = re.compile(r"^(?:.*\.)?up_blocks\.(\d+)\.resnets\.(\d+)\.scetuner_([^.]+)\.tuner_op\.(ln[12]\.(?:weight|bias))$")
_SCEPTER_KEY = re.compile(r"^(?:.*\.)?lsc_identity\.(\d+)\.tuner_op\.(ln[12]\.(?:weight|bias))$")


def sc_tuner_state_dict(unet) -> Dict[str, np.ndarray]:
    return {key: p.asnumpy().astype(np.float32) for key, p in sc_tuner_named_parameters(unet).items()}


def swift_config(dims: List[int], down_ratio: float) -> dict:
    """The SCETuningConfig fields ms-swift writes and reads."""
    return {
        "swift_type": "SCETuning",  # the value of ms-swift's SwiftTuners.SCETUNING, which from_pretrained checks
        "dims": list(dims),
        "target_modules": TARGET_MODULES,
        "hint_modules": None,
        "tuner_mode": "decoder",
        "tuner_op": "SCEAdapter",
        "down_ratio": down_ratio,
        "model_key_mapping": None,
    }


def adapter_config(unet, config: SCTunerConfig) -> dict:
    return swift_config(sc_tuner_dims(unet), config.down_ratio)


def _write_adapter_folder(folder: str, state: Dict[str, np.ndarray], config: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _write_swift(folder: str, state: Dict[str, np.ndarray], config: dict, adapter: str, swift_root: bool) -> str:
    if not swift_root:
        _write_adapter_folder(folder, state, config)
        return folder
    _write_adapter_folder(os.path.join(folder, adapter), state, config)
    with open(os.path.join(folder, "configuration.json"), "w") as f:
        f.write("{}")
    return os.path.join(folder, adapter)


def save_sc_tuners(unet, folder: str, config: SCTunerConfig = SCTunerConfig(), swift_root: bool = False) -> str:
    """Write the tuners in ms-swift's layout: the adapter folder, or (swift_root) the whole save directory."""
    return _write_swift(folder, sc_tuner_state_dict(unet), adapter_config(unet, config), config.adapter_name, swift_root)


# -- reading ----------------------------------------------------------------------------------

def sc_tuner_file(path: str) -> str:
    """The weights file of a file, an adapter folder or an ms-swift save directory."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            return os.path.join(path, WEIGHTS_NAME)
        subs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, WEIGHTS_NAME)))
        if len(subs) == 1 or "default" in subs:
            return os.path.join(path, "default" if "default" in subs else subs[0], WEIGHTS_NAME)
        if len(subs) > 1:
            raise UserError(f"{path}: several adapters ({', '.join(subs)}); name the one to load")
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise UserError(f"{path}: adapter_model.bin is a torch pickle; save with safe_serialization=True")
    raise UserError(f"SC-Tuner weights not found: {path}")


def read_sc_tuner_file(path: str) -> Tuple[Dict[int, Dict[str, np.ndarray]], Optional[List[Tuple[int, int]]], str]:
    """({m: {ln1.weight: ..}}, [(i, j) of each m] or None for scepter, layout) of a tuner file."""
    file = sc_tuner_file(path)
    state, _ = read_weights(file)
    if not state:
        raise UserError(f"{file}: holds no tensors")
    first = next(iter(state))
    if _SCEPTER_KEY.match(first):
        tuners: Dict[int, Dict[str, np.ndarray]] = {}
        for key, value in state.items():
            m = _SCEPTER_KEY.match(key)
            if not m:
                raise UserError(f"{file}: key '{key}' is not an SC-Tuner key of scepter's layout")
            tuners.setdefault(int(m.group(1)), {})[m.group(2)] = value
        return dict(sorted(tuners.items())), None, "scepter"
    by_slot: Dict[Tuple[int, int], Dict[str, np.ndarray]] = {}
    for key, value in state.items():
        m = _SWIFT_KEY.match(key)
        if not m:
            raise UserError(f"{file}: key '{key}' is not an SC-Tuner key (up_blocks.i.resnets.j.scetuner_<name>... "
                            f"or lsc_identity.m...)")
        by_slot.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(4)] = value
    slots = sorted(by_slot)
    return {m: by_slot[s] for m, s in enumerate(slots)}, slots, "swift"


def _check_complete(tuners: Dict[int, Dict[str, np.ndarray]], where: str) -> None:
    for m, params in tuners.items():
        for name in PARAM_NAMES:
            if name not in params:
                raise UserError(f"{where}: tuner {m} has no '{name}'")


def load_sc_tuners(unet, path: str) -> None:
    """Load tuner weights (ms-swift or scepter layout; file, adapter folder or ms-swift directory) into `unet`.

    Every key and shape is checked before anything is assigned: nothing is half-loaded.
    """
    file = sc_tuner_file(path)
    tuners, slots, layout = read_sc_tuner_file(file)
    params = sc_tuner_named_parameters(unet)
    unet_slots = decoder_skip_slots(unet)
    prefix = {}  # (i, j) -> "up_blocks.i.resnets.j.scetuner_<this UNet's adapter>"
    for key in params:
        match = _SWIFT_KEY.match(key)
        prefix[(int(match.group(1)), int(match.group(2)))] = key.rsplit(".tuner_op.", 1)[0]
    state = {}
    for m, tensors in tuners.items():
        slot = slots[m] if slots is not None else (unet_slots[m] if m < len(unet_slots) else None)
        shown = f"lsc_identity.{m}" if slots is None else f"up_blocks.{slot[0]}.resnets.{slot[1]}"
        if slot not in prefix:
            raise UserError(f"{file}: key '{shown}.{next(iter(tensors))}' does not fit this UNet's SC-Tuners")
        for name, value in tensors.items():
            key = f"{prefix[slot]}.tuner_op.{name}"
            if key not in params:
                raise UserError(f"{file}: key '{shown}...{name}' does not fit this UNet's SC-Tuners")
            if tuple(value.shape) != tuple(params[key].shape):
                raise UserError(f"{file}: '{shown}...tuner_op.{name}' has shape {tuple(value.shape)}, "
                                f"this UNet expects {tuple(params[key].shape)}")
            state[key] = value
    missing = sorted(set(params) - set(state))
    if missing:
        raise UserError(f"{file}: missing key '{missing[0]}' ({len(missing)} missing)")
    for key, value in state.items():
        params[key].set_data(ms.Tensor(value.astype(np.float32), params[key].dtype))


def convert_sc_tuners(src: str, dst: str, to: str = "swift", adapter_name: str = "default",
                      resnets_per_block: int = 3, swift_root: bool = True) -> str:
    """Rewrite a tuner file between ms-swift's and scepter's layouts, no UNet needed.

    scepter -> swift places tuner m at up_blocks.{m // resnets_per_block}.resnets.{m % resnets_per_block}
    (3 for SD1.x/2.x/SDXL: layers_per_block + 1); dims and down_ratio come from the tensors.
    """
    tuners, slots, _ = read_sc_tuner_file(src)
    _check_complete(tuners, src)
    if to == "scepter":
        state = {f"lsc_identity.{m}.tuner_op.{n}": v for m, t in tuners.items() for n, v in t.items()}
        file = dst if dst.endswith(".safetensors") else os.path.join(dst, "sce_tuners.safetensors")
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
        save_file(state, file, metadata={"format": "pt"})
        return file
    if to != "swift":
        raise UserError(f"unknown SC-Tuner layout '{to}': choose one of {', '.join(LAYOUTS)}")
    if slots is None:
        slots = [(m // resnets_per_block, m % resnets_per_block) for m in sorted(tuners)]
    state = {
        f"up_blocks.{i}.resnets.{j}.scetuner_{adapter_name}.tuner_op.{n}": v
        for m, (i, j) in zip(sorted(tuners), slots) for n, v in tuners[m].items()
    }
    dims = [int(tuners[m]["ln2.weight"].shape[0]) for m in sorted(tuners)]
    ratios = {tuners[m]["ln1.weight"].shape[0] / tuners[m]["ln1.weight"].shape[1] for m in sorted(tuners)}
    return _write_swift(dst, state, swift_config(dims, float(min(ratios))), adapter_name, swift_root)
