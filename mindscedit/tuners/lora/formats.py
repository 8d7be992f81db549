"""LoRA weight layouts on disk, as plain numpy: diffusers/peft and kohya (webui).

Every layout is read into, and written from, one neutral form: {module: LoraModule}, the module
named by its diffusers path with the component in front (`unet.down_blocks.0...attn1.to_q`,
`text_encoder.text_model...q_proj`).

diffusers/peft (`pytorch_lora_weights.safetensors`, what diffusers' `load_lora_weights` reads):
  `<module>.lora_A.weight` [r, in], `<module>.lora_B.weight` [out, r], DoRA `<module>.lora_magnitude_vector`
  [out]; rank and alpha in the safetensors metadata `lora_adapter_metadata`, a JSON of LoraConfig
  fields prefixed by component (`unet.r`, `unet.lora_alpha`, `unet.target_modules`,
  `unet.rank_pattern`, `unet.alpha_pattern`, `unet.use_dora`), as diffusers writes and reads it.
  Without metadata diffusers takes alpha = rank; a `<module>.alpha` key is honoured too.
kohya (`lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, text encoder
  `lora_te_`): the module path is flattened with "_" (diffusers-style names, as kohya's scripts
  write for SD1.x/2.x). Reading also accepts the original-LDM names of SD1.x/2.x attention blocks
  (`input_blocks_1_1_...`, `middle_block_1_...`, `output_blocks_3_1_...`). Not covered: SDXL's
  LDM names, kohya's DoRA (`dora_scale`) and LyCORIS variants (LoHa, LoKr).
"""
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ...errors import UserError

DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
LAYOUTS = ("diffusers", "kohya")

# component prefix: diffusers <-> kohya
COMPONENTS = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
KOHYA_ALIASES = {"lora_te1_": "text_encoder"}

# Module-name pieces that contain "_" themselves, so a flattened kohya name can be split back.
COMPOUND_NAMES = [
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_k_proj", "add_v_proj", "text_model", "self_attn",
    "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2",
]
_COMPOUND_TOKENS = sorted((tuple(n.split("_")) for n in COMPOUND_NAMES), key=len, reverse=True)


@dataclass
class LoraModule:
    down: np.ndarray  # lora_A / lora_down [r, in]
    up: np.ndarray  # lora_B / lora_up [out, r]
    alpha: float
    magnitude: Optional[np.ndarray] = None  # DoRA m [out]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# -- kohya names ------------------------------------------------------------------------------

def kohya_name(module: str) -> str:
    component, path = module.split(".", 1)
    if component not in COMPONENTS:
        raise UserError(f"'{module}': no kohya name for component '{component}'")
    return COMPONENTS[component] + path.replace(".", "_")


def _unflatten(flat: str) -> str:
    tokens, parts, i = flat.split("_"), [], 0
    while i < len(tokens):
        for compound in _COMPOUND_TOKENS:
            if tuple(tokens[i:i + len(compound)]) == compound:
                parts.append("_".join(compound))
                i += len(compound)
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def _ldm_to_diffusers(flat: str) -> str:
    """SD1.x/2.x original-LDM block names of the attention blocks -> diffusers names (flattened)."""
    m = re.match(r"input_blocks_(\d+)_1_(.*)", flat)
    if m:
        n = int(m.group(1))
        return f"down_blocks_{(n - 1) // 3}_attentions_{(n - 1) % 3}_{m.group(2)}"
    m = re.match(r"output_blocks_(\d+)_1_(.*)", flat)
    if m:
        n = int(m.group(1))
        return f"up_blocks_{n // 3}_attentions_{n % 3}_{m.group(2)}"
    m = re.match(r"middle_block_1_(.*)", flat)
    if m:
        return f"mid_block_attentions_0_{m.group(1)}"
    if re.match(r"(input_blocks|output_blocks|middle_block)_", flat):
        raise UserError(f"kohya key 'lora_unet_{flat}': only attention blocks of the LDM naming are supported")
    return flat


def module_from_kohya(name: str) -> str:
    """`lora_unet_down_blocks_0_..._to_q` -> `unet.down_blocks.0...to_q`."""
    for component, prefix in list(COMPONENTS.items()) + [(v, k) for k, v in KOHYA_ALIASES.items()]:
        if name.startswith(prefix):
            flat = name[len(prefix):]
            if component == "unet":
                flat = _ldm_to_diffusers(flat)
            return f"{component}.{_unflatten(flat)}"
    raise UserError(f"kohya key '{name}' starts with none of {', '.join(COMPONENTS.values())}")


# -- reading ----------------------------------------------------------------------------------

def detect_layout(state: Dict[str, np.ndarray]) -> str:
    keys = list(state)
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    raise UserError(f"not a LoRA file: no lora_A/lora_B or lora_down/lora_up keys (first key '{keys[0] if keys else ''}')")


def _split_key(key: str, suffixes: Tuple[str, ...]) -> Tuple[str, str]:
    for suffix in suffixes:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise UserError(f"unexpected key '{key}' (expected one ending in {', '.join(suffixes)})")


def _metadata_config(metadata: dict, component: str) -> dict:
    """LoraConfig fields for one component: prefixed keys (diffusers), or unprefixed ones (older files)."""
    prefixed = {k[len(component) + 1:]: v for k, v in metadata.items() if k.startswith(component + ".")}
    if prefixed:
        return prefixed
    return metadata if component == "unet" and "r" in metadata else {}


def _pattern_value(pattern: dict, path: str, default):
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):  # peft's rule for rank_pattern / alpha_pattern
            return value
    return default


def from_diffusers(state: Dict[str, np.ndarray], metadata: Optional[dict] = None) -> Dict[str, LoraModule]:
    parts: Dict[str, dict] = {}
    for key, value in state.items():
        module, kind = _split_key(key, ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "alpha"))
        if "." not in module:
            raise UserError(f"key '{key}' has no component prefix (unet. / text_encoder.)")
        parts.setdefault(module, {})[kind] = value
    modules = {}
    for module, p in parts.items():
        if "lora_A.weight" not in p or "lora_B.weight" not in p:
            missing = "lora_A.weight" if "lora_A.weight" not in p else "lora_B.weight"
            raise UserError(f"'{module}' has no '{missing}'")
        component, path = module.split(".", 1)
        config = _metadata_config(metadata or {}, component)
        rank = int(p["lora_A.weight"].shape[0])
        alpha = config.get("lora_alpha", rank) if config else rank
        alpha = _pattern_value(config.get("alpha_pattern"), path, alpha)
        if "alpha" in p:
            alpha = float(np.asarray(p["alpha"]).reshape(()))
        modules[module] = LoraModule(p["lora_A.weight"], p["lora_B.weight"], float(alpha), p.get("lora_magnitude_vector"))
    return modules


def from_kohya(state: Dict[str, np.ndarray]) -> Dict[str, LoraModule]:
    parts: Dict[str, dict] = {}
    for key, value in state.items():
        name, kind = _split_key(key, ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale"))
        if kind == "dora_scale":
            raise UserError(f"'{key}': kohya-layout DoRA is not supported; use the diffusers layout for DoRA")
        parts.setdefault(name, {})[kind] = value
    modules = {}
    for name, p in parts.items():
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            raise UserError(f"kohya module '{name}' lacks lora_down or lora_up")
        rank = int(p["lora_down.weight"].shape[0])
        alpha = float(np.asarray(p["alpha"]).reshape(())) if "alpha" in p else float(rank)
        modules[module_from_kohya(name)] = LoraModule(p["lora_down.weight"], p["lora_up.weight"], alpha)
    return modules


def read_state(state: Dict[str, np.ndarray], metadata: Optional[dict] = None) -> Tuple[Dict[str, LoraModule], str]:
    layout = detect_layout(state)
    return (from_kohya(state) if layout == "kohya" else from_diffusers(state, metadata)), layout


# -- writing ----------------------------------------------------------------------------------

def to_diffusers(modules: Dict[str, LoraModule]) -> Tuple[Dict[str, np.ndarray], dict]:
    """(state dict, metadata) of the diffusers/peft layout."""
    state, metadata = {}, {}
    by_component: Dict[str, List[str]] = {}
    for module, m in modules.items():
        state[f"{module}.lora_A.weight"] = np.ascontiguousarray(m.down, np.float32)
        state[f"{module}.lora_B.weight"] = np.ascontiguousarray(m.up, np.float32)
        if m.magnitude is not None:
            state[f"{module}.lora_magnitude_vector"] = np.ascontiguousarray(m.magnitude, np.float32)
        by_component.setdefault(module.split(".", 1)[0], []).append(module)
    for component, names in by_component.items():
        paths = {n: n.split(".", 1)[1] for n in names}
        rank = Counter(modules[n].rank for n in names).most_common(1)[0][0]
        alpha = Counter(modules[n].alpha for n in names).most_common(1)[0][0]
        config = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted(paths.values()),  # exact paths: peft matches them as suffixes
            "rank_pattern": {paths[n]: modules[n].rank for n in names if modules[n].rank != rank},
            "alpha_pattern": {paths[n]: modules[n].alpha for n in names if modules[n].alpha != alpha},
            "use_dora": any(modules[n].magnitude is not None for n in names),
            "init_lora_weights": "gaussian",
            "lora_dropout": 0.0,
        }
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    return state, metadata


def to_kohya(modules: Dict[str, LoraModule]) -> Dict[str, np.ndarray]:
    state = {}
    for module, m in modules.items():
        if m.magnitude is not None:
            raise UserError(f"'{module}' is a DoRA module: the kohya layout here has no DoRA; keep the diffusers layout")
        name = kohya_name(module)
        state[f"{name}.lora_down.weight"] = np.ascontiguousarray(m.down, np.float32)
        state[f"{name}.lora_up.weight"] = np.ascontiguousarray(m.up, np.float32)
        state[f"{name}.alpha"] = np.asarray(m.alpha, np.float32)
    return state


def write_state(modules: Dict[str, LoraModule], layout: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(state dict, safetensors metadata strings) for `layout`."""
    if layout == "kohya":
        return to_kohya(modules), {"format": "pt"}
    if layout == "diffusers":
        state, config = to_diffusers(modules)
        return state, {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    raise UserError(f"unknown LoRA layout '{layout}': choose one of {', '.join(LAYOUTS)}")


# -- combining --------------------------------------------------------------------------------

def combine(adapters: List[Dict[str, LoraModule]], weights: List[float], mode: str = "cat") -> Dict[str, LoraModule]:
    """Merge several LoRAs into one.

    cat (exact): A = [A_1; A_2; ...] and B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] along the rank, alpha =
      the new rank, so B A = sum_i w_i s_i B_i A_i exactly (peft's combination_type="cat").
    linear (peft's "linear", same ranks only): A = sum_i sqrt(w_i) s_i A_i, B = sum_i sqrt(w_i) B_i,
      alpha = rank; keeps the rank but is not the sum of the updates (cross terms).
    """
    if len(adapters) != len(weights):
        raise UserError(f"{len(adapters)} adapters but {len(weights)} weights")
    if mode not in ("cat", "linear"):
        raise UserError(f"combination '{mode}' is not one of cat, linear")
    out = {}
    for module in sorted(set().union(*adapters)):
        present = [(a[module], w) for a, w in zip(adapters, weights) if module in a]
        if any(m.magnitude is not None for m, _ in present):
            raise UserError(f"'{module}': DoRA adapters cannot be combined (their magnitudes do not add)")
        if mode == "cat":
            down = np.concatenate([m.down for m, _ in present], axis=0)
            up = np.concatenate([w * m.scaling * m.up for m, w in present], axis=1)
        else:
            ranks = {m.rank for m, _ in present}
            if len(ranks) != 1:
                raise UserError(f"'{module}': linear combination needs equal ranks, got {sorted(ranks)}; use cat")
            if any(w < 0 for _, w in present):
                raise UserError("linear combination needs weights >= 0; use cat")
            down = sum(np.sqrt(w) * m.scaling * m.down.astype(np.float64) for m, w in present)
            up = sum(np.sqrt(w) * m.up.astype(np.float64) for m, w in present)
        out[module] = LoraModule(down.astype(np.float32), up.astype(np.float32), float(down.shape[0]))
    return out
