"""Where the MindSpore internals this package touches live, on each MindSpore it supports.

MindSpore 2.9 moved the Python side of the graph compiler: `mindspore.common.api` became
`mindspore.graph.api` and `mindspore._extends.parse` became `mindspore.graph._parse`. From 2.9
on, the old modules are only copies of the new ones' attributes, taken once at import (and they
log a deprecation warning), so a module attribute set through an old name is never read by
MindSpore. Hence the newest location is always tried first, and an older one only when the
newer one does not exist.

Import the names below from here instead of from MindSpore:

    graph_api             the module with `_cell_graph_executor` and `entry_script_path` (the
                          file the compile cache scans for source dependencies)
    cell_graph_executor   `_cell_graph_executor`, which compiles Cells and frees their graphs
    compile_config        the module whose COMPILE_PROFILE switch makes MindSpore print each
                          compile's phase times

`let_map_workers_shut_down()` works around a MindSpore 2.7 slip that can hang a run at its end.

The names above are looked up on first use, not when this module is imported: some of them
(the compile profile switch) only take effect if set before MindSpore reads them. A name whose
module this MindSpore lacks raises ImportError, as the plain import did, naming every place tried
and the MindSpore version; the caller then switches its feature off.
"""
import importlib
from types import ModuleType
from typing import Dict, Tuple

# name: (an attribute that the module must have, its modules from newest to oldest MindSpore)
_MODULES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "graph_api": ("_cell_graph_executor", ("mindspore.graph.api", "mindspore.common.api")),
    "compile_config": (
        "COMPILE_PROFILE",
        ("mindspore.graph._parse.compile_config", "mindspore._extends.parse.compile_config"),
    ),
}
# name: (the module name above that holds it, attribute in that module)
_ATTRIBUTES: Dict[str, Tuple[str, str]] = {
    "cell_graph_executor": ("graph_api", "_cell_graph_executor"),
}

__all__ = sorted([*_MODULES, *_ATTRIBUTES])

_found: Dict[str, ModuleType] = {}


def _module(name: str) -> ModuleType:
    if name in _found:
        return _found[name]
    required, candidates = _MODULES[name]
    for candidate in candidates:
        try:
            module = importlib.import_module(candidate)
        except ImportError:
            continue
        if hasattr(module, required):
            _found[name] = module
            return module
    import mindspore

    raise ImportError(
        f"MindSpore {mindspore.__version__} has no {name} module (looked for {required} in {', '.join(candidates)})"
    )


def __getattr__(name: str):
    # Module-level __getattr__ (PEP 562): `from mindscedit.compat import graph_api` lands here.
    if name in _MODULES:
        return _module(name)
    if name in _ATTRIBUTES:
        module_name, attribute = _ATTRIBUTES[name]
        return getattr(_module(module_name), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def let_map_workers_shut_down() -> bool:
    """Make a map's worker pool tell its clean-up process to quit when the pool is torn down.

    MindSpore 2.7 tests the wrong attribute name (``eof`` for ``eof_clean_process``) in
    ``_PythonMultiprocessing._abort_monitor``, so the clean-up process forked beside each map's
    loader processes is never told to quit: tearing the pipeline down waits 5 s for it and then
    sends it SIGTERM. Its C++ SIGTERM handler takes a mutex that can have been held by another
    thread at fork time (two pipelines at once, as DreamBooth's instance and class loaders), and
    then the handler, and the main process waiting for it, hang for good. Giving the pool the
    attribute the check looks for lets the quit event be set, as later MindSpore versions do.

    Call before a pipeline with Python worker processes is built. Returns True when this call
    applied the fix (False on a MindSpore without the slip, and on later calls).
    """
    import inspect

    from mindspore.dataset.engine.datasets import _PythonMultiprocessing as pool

    if hasattr(pool, "eof") or "hasattr(self, 'eof')" not in inspect.getsource(pool._abort_monitor):
        return False
    pool.eof = True  # read only by that hasattr test
    return True
