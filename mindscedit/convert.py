"""`mindscedit convert`: rewrite tuner weights between layouts without loading a model.

SC-Tuners: swift (ms-swift) <-> scepter. LoRA: diffusers (peft) <-> kohya. Tensors are copied as
they are (same values, same dtype float32); only names, alphas and configs change.
"""
from .errors import UserError

SC_FORMATS = ("swift", "scepter")
LORA_FORMATS = ("diffusers", "kohya")
FORMATS = SC_FORMATS + LORA_FORMATS


def _family(fmt: str, flag: str) -> str:
    if fmt in SC_FORMATS:
        return "SC-Tuner"
    if fmt in LORA_FORMATS:
        return "LoRA"
    raise UserError(f"{flag} '{fmt}' is not one of {', '.join(FORMATS)}")


def convert(src_format: str, dst_format: str, src: str, dst: str, resnets_per_block: int = 3) -> str:
    """Convert `src` (file or folder) in `src_format` to `dst` in `dst_format`; returns what was written."""
    family = _family(src_format, "--from")
    if _family(dst_format, "--to") != family:
        raise UserError(f"cannot convert {family} weights ({src_format}) to {dst_format}: "
                        f"SC-Tuner formats are {', '.join(SC_FORMATS)}, LoRA formats {', '.join(LORA_FORMATS)}")
    if family == "SC-Tuner":
        from .tuners.sc_tuner.io import convert_sc_tuners, read_sc_tuner_file

        found = read_sc_tuner_file(src)[2]
        if found != src_format:
            raise UserError(f"{src}: holds {found} keys, not {src_format}")
        return convert_sc_tuners(src, dst, to=dst_format, resnets_per_block=resnets_per_block)
    from .tuners.lora.io import read_lora_file, write_lora_file

    modules, found = read_lora_file(src)
    if found != src_format:
        raise UserError(f"{src}: holds {found}-layout LoRA keys, not {src_format}")
    return write_lora_file(modules, dst, dst_format)
