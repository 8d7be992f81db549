"""MindSpore context: device, graph mode, jit level and data-parallel setup."""
import contextlib
import glob
import io
import logging
import os
from dataclasses import dataclass

import mindspore as ms

from .errors import UserError

logger = logging.getLogger("mindscedit")


def _import_mindone_quietly() -> None:
    """mindone's flash-attention module prints a line to stdout when first imported (from
    mindone.transformers and mindone's training utilities): import it once here, silenced, so
    that line stays out of every command's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            import mindone.models.modules.flash_attention  # noqa: F401
        except ImportError:
            pass


_import_mindone_quietly()

# The compute dtype of each `mixed_precision` setting (training, sampling, bench).
DTYPES = {"no": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
# fp16 runs on CPU (slowly: a check of the Ascend dtype path); bf16 does not.
BF16_ON_CPU = ("mixed_precision bf16 needs an Ascend device (MindSpore's CPU has no bf16 MatMul kernel); "
               "check a bf16 step's types on CPU with: mindscedit bench --mixed_precision bf16 --compile_only")
FP16_ON_CPU = "mixed_precision fp16 on CPU: for checking the Ascend dtype path, not for speed"


@dataclass
class Runtime:
    device_target: str
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_device(requested: str = "auto") -> str:
    """``requested`` unless it is "auto"; then Ascend if MindSpore can use it, else CPU.

    Falling back to CPU logs one warning when an error caused it: the availability check raised,
    or MindSpore recorded that its Ascend plugin failed to load on a machine that has NPUs. The
    plugin's load failure does not raise: ``import mindspore`` records it and ``is_available``
    returns False. A machine without NPUs records the same failure (the plugin ships in the wheel
    but CANN's libraries are absent), so there it is the ordinary "no Ascend here" and is quiet.
    """
    if requested != "auto":
        return requested
    try:
        from mindspore import hal

        if hal.is_available("Ascend"):
            return "Ascend"
    except Exception as exc:  # the check itself broke: say so rather than train on CPU unannounced
        logger.warning("Ascend check failed, using CPU: %s", _first_line(exc))
        return "CPU"
    plugin_error = _ascend_plugin_error()
    if plugin_error and _has_npus():
        hint = " (source CANN's set_env.sh?)" if "cannot open shared object" in plugin_error else ""
        logger.warning("Ascend plugin failed to load, using CPU: %s%s", plugin_error, hint)
    return "CPU"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


def _ascend_plugin_error() -> str:
    """First Ascend line of MindSpore's record of plugin load failures ("" if there is none)."""
    try:
        from mindspore._c_expression import MSContext

        record = MSContext.get_instance().load_plugin_error()
    except Exception:  # a private API: when it is missing or changed there is just nothing to add
        return ""
    for line in str(record).splitlines():
        if "ascend" in line.lower():
            return line.strip()
    return ""


def _has_npus() -> bool:
    """Whether the Ascend driver exposes NPUs here (its device files, also mapped into containers)."""
    return os.path.exists("/dev/davinci_manager") or bool(glob.glob("/dev/davinci[0-9]*"))


def launched_by_msrun() -> bool:
    """True in a process started by msrun (it exports MS_ROLE=MS_WORKER/MS_SCHED and MS_WORKER_NUM)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED") and "MS_WORKER_NUM" in os.environ


def launched_with_rank_table() -> bool:
    """True under an Ascend rank-table launch (RANK_TABLE_FILE and RANK_SIZE > 1)."""
    return "RANK_TABLE_FILE" in os.environ and int(os.environ.get("RANK_SIZE", "1")) > 1


def init_runtime(device_target: str = "auto", distributed: bool = False, deterministic: bool = False) -> Runtime:
    """GRAPH_MODE on the chosen device; under msrun (or a rank table) data parallel with gradient mean.

    `distributed=True` asks for data parallel explicitly, and fails in one line without a launcher.
    """
    device_target = detect_device(device_target)
    ms.set_context(mode=ms.GRAPH_MODE, device_target=device_target)
    if deterministic:
        ms.set_context(deterministic="ON")
    launched = launched_by_msrun() or launched_with_rank_table()
    if distributed and not launched:
        raise UserError(
            "--distributed needs a launcher that starts one process per card: "
            "msrun (see scripts/run_train_distributed.sh)"
        )
    if launched:
        from mindspore.communication import get_group_size, get_rank, init

        init()
        ms.reset_auto_parallel_context()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        return Runtime(device_target, rank=get_rank(), world_size=get_group_size())
    return Runtime(device_target)
