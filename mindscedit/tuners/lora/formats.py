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
kohya (`lora_<component>_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`), by family:
  sd    (SD1.x/2.x): `lora_unet_<diffusers path>`, text encoder `lora_te_`, as kohya's SD1 scripts write;
  sdxl: the UNet in the original LDM/SGM block names kohya's SDXL scripts write
        (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `..._middle_block_1_...`,
        `..._output_blocks_0_1_...`, resnets `..._input_blocks_1_0_emb_layers_1`), text encoders
        `lora_te1_` / `lora_te2_`.
  Reading accepts both namings for any family. Not covered: convolution LoRA (LoCon: conv_in,
  samplers, resnet convs), kohya's DoRA (`dora_scale`) and LyCORIS variants (LoHa, LoKr).

The LDM/SGM numbering is the same for SD1.x/2.x and SDXL (both have 2 resnets per down level,
3 per up level): input_blocks n >= 1 is down_blocks[(n-1)//3] layer (n-1)%3, output_blocks n is
up_blocks[n//3] layer n%3; the second index is 0 for the resnet, 1 for the attention block.
mindone's `lora_conversion_utils` (`_maybe_map_sgm_blocks_to_diffusers`) implements only the read
direction, into diffusers' legacy attention-processor names, needs the UNet config and imports
MindSpore; one table here serves both directions of these plain-numpy files, and the tests check
it against mindone's mapping.
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
SDXL_COMPONENTS = dict(COMPONENTS, text_encoder="lora_te1_")
KOHYA_ALIASES = {"lora_te1_": "text_encoder"}
FAMILIES = ("sd", "sdxl")
# both SD1.x/2.x and SDXL: 2 resnets + a downsampler per down level, 3 resnets per up level
LDM_LAYERS = 3

# Module-name pieces that contain "_" themselves, so a flattened kohya name can be split back.
COMPOUND_NAMES = [
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_k_proj", "add_v_proj", "text_model", "self_attn",
    "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2",
    "add_embedding", "text_projection",
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

def detect_family(modules) -> str:
    """"sdxl" when the module names show a structure only SDXL has, else "sd": a second text encoder,
    the text_time add_embedding, or a transformer depth above 1 (SD1.x/2.x have one transformer
    block per attention; SDXL 2 or 10, so any SDXL attention LoRA shows one)."""
    for module in modules:
        if module.startswith(("text_encoder_2.", "unet.add_embedding.")):
            return "sdxl"
        if module.startswith("unet.") and re.search(r"\.transformer_blocks\.[1-9]", module):
            return "sdxl"
    return "sd"


def kohya_name(module: str, family: str = "sd") -> str:
    component, path = module.split(".", 1)
    prefixes = SDXL_COMPONENTS if family == "sdxl" else COMPONENTS
    if component not in prefixes:
        raise UserError(f"'{module}': no kohya name for component '{component}'")
    if component == "unet" and family == "sdxl":
        return prefixes[component] + _diffusers_to_ldm(path)
    return prefixes[component] + path.replace(".", "_")


# Dense layers outside the attention blocks: diffusers name <-> LDM name (kohya's SDXL UNet)
_RESNET_LDM = {"time_emb_proj": "emb_layers_1"}
_TOP_LDM = {"time_embedding.linear_1": "time_embed_0", "time_embedding.linear_2": "time_embed_2",
            "add_embedding.linear_1": "label_emb_0_0", "add_embedding.linear_2": "label_emb_0_2"}
_RESNET_DIFFUSERS = {v: k for k, v in _RESNET_LDM.items()}
_TOP_DIFFUSERS = {v: k.replace(".", "_") for k, v in _TOP_LDM.items()}


def _ldm_inner(part: str, rest: str, module: str) -> str:
    """The flattened name inside an LDM block: attention blocks keep diffusers' inner names."""
    if part == "attentions":
        return rest.replace(".", "_")
    if rest not in _RESNET_LDM:
        raise UserError(f"'unet.{module}': no kohya SDXL name (LoRA on resnets covers {', '.join(_RESNET_LDM)})")
    return _RESNET_LDM[rest]


def _diffusers_to_ldm(path: str) -> str:
    """diffusers UNet path -> flattened LDM/SGM name (without `lora_unet_`)."""
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if m:
        side, level, part, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        n = LDM_LAYERS * level + layer + (1 if side == "down" else 0)  # input_blocks_0 is conv_in
        block = "input_blocks" if side == "down" else "output_blocks"
        return f"{block}_{n}_{int(part == 'attentions')}_{_ldm_inner(part, rest, path)}"
    m = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if m:  # middle_block: resnet 0, attention, resnet 1
        index = 1 if m.group(1) == "attentions" else 2 * int(m.group(2))
        return f"middle_block_{index}_{_ldm_inner(m.group(1), m.group(3), path)}"
    if path in _TOP_LDM:
        return _TOP_LDM[path]
    raise UserError(f"'unet.{path}': no kohya SDXL name for this module")


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


def _diffusers_inner(part: str, rest: str, flat: str) -> str:
    if part == "attentions":
        return rest
    if rest not in _RESNET_DIFFUSERS:
        raise UserError(f"kohya key 'lora_unet_{flat}': of the LDM resnet layers only "
                        f"{', '.join(_RESNET_DIFFUSERS)} (a Dense layer) is supported")
    return _RESNET_DIFFUSERS[rest]


def _ldm_to_diffusers(flat: str) -> str:
    """Original-LDM/SGM block names (SD1.x/2.x and SDXL) -> diffusers names (flattened)."""
    m = re.fullmatch(r"(input|output)_blocks_(\d+)_([01])_(.+)", flat)
    if m and not (m.group(1) == "input" and m.group(2) == "0"):
        side, n, part = m.group(1), int(m.group(2)), "attentions" if m.group(3) == "1" else "resnets"
        level, layer = divmod(n - 1 if side == "input" else n, LDM_LAYERS)
        if side == "input" and layer == LDM_LAYERS - 1:
            raise UserError(f"kohya key 'lora_unet_{flat}': input_blocks_{n} is a downsampler (convolution LoRA "
                            f"is not supported)")
        block = "down_blocks" if side == "input" else "up_blocks"
        return f"{block}_{level}_{part}_{layer}_{_diffusers_inner(part, m.group(4), flat)}"
    m = re.fullmatch(r"middle_block_([012])_(.+)", flat)
    if m:
        part, layer = ("attentions", 0) if m.group(1) == "1" else ("resnets", int(m.group(1)) // 2)
        return f"mid_block_{part}_{layer}_{_diffusers_inner(part, m.group(2), flat)}"
    if flat in _TOP_DIFFUSERS:
        return _TOP_DIFFUSERS[flat]
    if re.match(r"(input_blocks|output_blocks|middle_block|time_embed|label_emb|out)_", flat):
        raise UserError(f"kohya key 'lora_unet_{flat}': not a Dense layer of the LDM naming that is supported "
                        f"(attention blocks, resnets' emb_layers_1, time_embed, label_emb)")
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


def to_kohya(modules: Dict[str, LoraModule], family: Optional[str] = None) -> Dict[str, np.ndarray]:
    """kohya's names for `family` ("sd" or "sdxl"; None: detect_family)."""
    family = family or detect_family(modules)
    if family not in FAMILIES:
        raise UserError(f"unknown model family '{family}': choose one of {', '.join(FAMILIES)}")
    state = {}
    for module, m in modules.items():
        if m.magnitude is not None:
            raise UserError(f"'{module}' is a DoRA module: the kohya layout here has no DoRA; keep the diffusers layout")
        name = kohya_name(module, family)
        state[f"{name}.lora_down.weight"] = np.ascontiguousarray(m.down, np.float32)
        state[f"{name}.lora_up.weight"] = np.ascontiguousarray(m.up, np.float32)
        state[f"{name}.alpha"] = np.asarray(m.alpha, np.float32)
    return state


def write_state(modules: Dict[str, LoraModule], layout: str,
                family: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(state dict, safetensors metadata strings) for `layout`; `family` picks kohya's naming."""
    if layout == "kohya":
        return to_kohya(modules, family), {"format": "pt"}
    if layout == "diffusers":
        state, config = to_diffusers(modules)
        return state, {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    raise UserError(f"unknown LoRA layout '{layout}': choose one of {', '.join(LAYOUTS)}")


# -- combining --------------------------------------------------------------------------------

def combine(adapters: List[Dict[str, LoraModule]], weights: List[float], mode: str = "cat", **options) -> Dict[str, LoraModule]:
    """Merge several LoRAs into one: `mode` is one of merge.COMBINATIONS (peft's add_weighted_adapter).

    cat (exact): A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] and B = [B_1, B_2, ...] along the rank, alpha =
      the new rank, so B A = sum_i w_i s_i B_i A_i exactly.
    linear (same ranks only): A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i, alpha = rank;
      keeps the rank but is not the sum of the updates (cross terms). The others: see merge.py;
      `options` are merge.merge_adapters' (density, majority_sign_method, rank, svd_clamp, seed, names).
    """
    from .merge import merge_adapters

    return merge_adapters(adapters, weights, mode, **options)
