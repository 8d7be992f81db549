"""`mindscedit convert`: rewrite tuner weights between layouts without loading a model.

SC-Tuners: swift (ms-swift) <-> scepter. LoRA: diffusers (peft) <-> kohya; kohya's naming depends on
the model family (SD1.x/2.x or SDXL, see tuners/lora/formats.py): `family` names it, or it is
read off the module names. Tensors are copied as they are (same values, same dtype float32); only
names, alphas and configs change.
"""
from typing import Optional

from .errors import UserError

SC_FORMATS = ("swift", "scepter")
LORA_FORMATS = ("diffusers", "kohya")
FORMATS = SC_FORMATS + LORA_FORMATS
FAMILIES = ("sd", "sdxl")  # tuners.lora.formats.FAMILIES, here so the CLI parser needs no MindSpore


def _kind(fmt: str, flag: str) -> str:
    if fmt in SC_FORMATS:
        return "SC-Tuner"
    if fmt in LORA_FORMATS:
        return "LoRA"
    raise UserError(f"{flag} '{fmt}' is not one of {', '.join(FORMATS)}")


def convert(src_format: str, dst_format: str, src: str, dst: str, resnets_per_block: int = 3,
            family: Optional[str] = None) -> str:
    """Convert `src` (file or folder) in `src_format` to `dst` in `dst_format`; returns what was written.
    `family` ("sd" / "sdxl") picks kohya's LoRA naming; None detects it from the module names."""
    kind = _kind(src_format, "--from")
    if _kind(dst_format, "--to") != kind:
        raise UserError(f"cannot convert {kind} weights ({src_format}) to {dst_format}: "
                        f"SC-Tuner formats are {', '.join(SC_FORMATS)}, LoRA formats {', '.join(LORA_FORMATS)}")
    if family is not None and family not in FAMILIES:
        raise UserError(f"--family '{family}' is not one of {', '.join(FAMILIES)}")
    if kind == "SC-Tuner":
        from .tuners.sc_tuner.io import convert_sc_tuners, read_sc_tuner_file

        found = read_sc_tuner_file(src)[2]
        if found != src_format:
            raise UserError(f"{src}: holds {found} keys, not {src_format}")
        return convert_sc_tuners(src, dst, to=dst_format, resnets_per_block=resnets_per_block)
    from .tuners.lora.io import read_lora_file, write_lora_file

    modules, found = read_lora_file(src)
    if found != src_format:
        raise UserError(f"{src}: holds {found}-layout LoRA keys, not {src_format}")
    return write_lora_file(modules, dst, dst_format, family)
