"""Compile the train step once per setup, not once per launch.

Compiling the UNet train step costs tens of seconds and over a GiB of host memory that the
process then keeps. MindSpore's compile cache saves the compiled front-end graph and loads it
on the next launch, but it names cached graphs only by compile order and checks only a hash of
the Python sources. So each setup gets its own folder, `<root>/<key>`, where the key hashes
everything that shapes the graph (see graph_key), and the cache is on only while the train step
compiles. MindSpore numbers cached graphs per process and keeps the first cache path it was
given, and switching the cache on after other graphs were compiled in the process breaks later
compiles. So the cache serves only processes that ask for it before compiling anything (the
`train` and `bench` commands call `allow_in_this_process()` first), and only their first train
step: the folder then holds exactly one graph, number 0, the step. A damaged entry is
recompiled by MindSpore. Graphs with control flow do not reload on MindSpore 2.10, which is
why the step is branch-free (see step.py); steps with gradient accumulation are compiled
without the cache.

A compiled step keeps what the front end built for as long as it lives (about 0.6 GiB of host
memory on the mid-size UNet); a step loaded from the cache does not. So on CPU a first launch,
once it has saved the step, drops it and loads it straight back (one graph load), ending up
0.2-0.35 GiB lower on that UNet. On Ascend the dropped step's device state is not known to survive
that, so there the step stays as compiled.
"""
import contextlib
import ctypes
import gc
import hashlib
import json
import logging
import os
import shutil
from typing import Optional, Sequence

import mindspore as ms

from ..models.graph_sharing import sharing_policy, update_with_cell_constants

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_process = {"allowed": False, "used": False}


def allow_in_this_process() -> None:
    """Call before anything is compiled: this process's first train step may use the cache."""
    _process["allowed"] = True


def graph_key(train_step, inputs: Sequence[ms.Tensor], world_size: int = 1) -> str:
    """A hash of everything the compiled step depends on, read off the step itself: the Python
    sources, every parameter's path, shape, dtype and trainability, each cell's class, constants
    and flags (loss settings, clipping, loss-scaler kind, recompute, mixed-precision casts), the
    inputs' shapes and dtypes, the jit level and the device. No run setting is listed by hand: a
    setting changes the key exactly when it changes one of those (the run's length, the
    learning-rate schedule, the output folder, the data and the logging do not: the learning
    rate is a step input)."""
    import mindone

    from .. import __version__

    params = [(name, tuple(p.shape), str(p.dtype), bool(p.requires_grad))
              for name, p in train_step.parameters_and_names()]
    # Cell attributes become graph constants: tensors (noise schedule tables) by value, plain
    # numbers and strings (heads, scales, eps) as they are.
    constants = hashlib.sha256()
    update_with_cell_constants(constants, train_step)
    blob = json.dumps(dict(
        sources=_package_sources_hash(),
        jit_config=getattr(train_step, "jit_config_dict", None) or {},
        params=params,
        inputs=[(tuple(x.shape), str(x.dtype)) for x in inputs],
        constants=constants.hexdigest(),
        world_size=world_size,
        sharing=sharing_policy(),  # how repeated blocks were compiled (graph_sharing.py)
        versions=(__version__, ms.__version__, mindone.__version__),
        context=(ms.get_context("device_target"), ms.get_context("mode")),
    ), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _package_sources_hash() -> str:
    """Our own sources: an installed package is outside MindSpore's dependency scan."""
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(_PACKAGE_ROOT)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()


def _compile_through_cache(train_step, inputs, folder):
    from ..compat import graph_api

    entry = getattr(graph_api, "entry_script_path", None)
    graph_api.entry_script_path = os.path.join(_PACKAGE_ROOT, "_compile_cache_entry.py")
    ms.set_context(enable_compile_cache=True, compile_cache_path=folder)
    try:
        train_step.compile(*inputs)
    finally:
        ms.set_context(enable_compile_cache=False)
        graph_api.entry_script_path = entry


def _graph_file(folder: str, rank: int, number: int) -> str:
    """Where MindSpore's cache keeps the `number`-th graph a process compiled."""
    return os.path.join(folder, f"rank_{rank}", "graph_cache", f"compile_cache_{number}.mindir")


def _reload_from_cache(train_step, inputs, folder: str, rank: int) -> None:
    """Drop the step just compiled and saved as graph 0 of `folder`, and load it back."""
    from ..compat import cell_graph_executor as _cell_graph_executor

    saved = _graph_file(folder, rank, 0)
    if not os.path.exists(saved):
        return  # MindSpore did not cache this graph: keep the compiled step
    _cell_graph_executor.del_net_res(train_step, set(train_step.compile_cache))
    train_step.compile_cache.clear()
    gc.collect()
    _release_freed_heap()  # before the load allocates: trimming only afterwards ends ~20 MiB higher
    # This is the process's second compile, so MindSpore looks for graph number 1, and after a
    # first compile it reloads only with its source check off (the folder's key covers the sources).
    second = _graph_file(folder, rank, 1)
    shutil.copyfile(saved, second)
    forced = os.environ.get("MS_DEV_FORCE_USE_COMPILE_CACHE")
    os.environ["MS_DEV_FORCE_USE_COMPILE_CACHE"] = "1"
    try:
        _compile_through_cache(train_step, inputs, folder)
    finally:
        if forced is None:
            del os.environ["MS_DEV_FORCE_USE_COMPILE_CACHE"]
        else:
            os.environ["MS_DEV_FORCE_USE_COMPILE_CACHE"] = forced
        with contextlib.suppress(FileNotFoundError):  # a launch of the same setup racing this one
            os.remove(second)


def _release_freed_heap():
    """Hand memory freed by the compiler back to the OS (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def compile_train_step(train_step, inputs: Sequence[ms.Tensor], cache_root: Optional[str],
                       rank: int = 0, world_size: int = 1) -> str:
    """Compile `train_step` for `inputs`, through the cache under `cache_root` when it can.

    Returns "hit" (a cached graph was there), "miss" (compiled and saved) or "off". Anything that
    is not a Cell (a stand-in step) is left to run as it is.
    """
    if not isinstance(train_step, ms.nn.Cell):
        return "off"
    folder = None
    if cache_root:
        try:  # the module whose entry script the cache scans, and that reloads the step (see compat.py)
            from ..compat import graph_api  # noqa: F401
        except ImportError as error:
            logger.warning("compile cache off: %s", error)
            cache_root = None
    if cache_root and getattr(train_step, "branch_free", False) and _process["allowed"] and not _process["used"]:
        key = graph_key(train_step, inputs, world_size)
        folder = os.path.join(os.path.expanduser(cache_root), key)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            logger.warning("compile cache off: cannot create %s (%s)", folder, error.strerror)
            folder = None
    if folder is None:
        train_step.compile(*inputs)
        _release_freed_heap()
        return "off"
    hit = os.path.exists(_graph_file(folder, rank, 0))
    _process["used"] = True
    _compile_through_cache(train_step, inputs, folder)
    if not hit and ms.get_context("device_target") == "CPU":
        _reload_from_cache(train_step, inputs, folder, rank)
    _release_freed_heap()
    return "hit" if hit else "miss"

