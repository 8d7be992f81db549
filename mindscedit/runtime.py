"""MindSpore context: device, graph mode, jit level and data-parallel setup."""
import logging
import os
from dataclasses import dataclass

import mindspore as ms

from .errors import UserError

logger = logging.getLogger("mindscedit")


@dataclass
class Runtime:
    device_target: str
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    try:
        from mindspore import hal

        if hal.is_available("Ascend"):
            return "Ascend"
    except Exception:  # no Ascend plugin installed: this is a CPU machine
        pass
    return "CPU"


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
