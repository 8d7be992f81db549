"""One training run per output folder.

A run holds `output_dir/.mindscedit.lock` (its pid and host) while it trains. A second run into
the same folder refuses in one line; a lock whose process is gone (a killed run, on this host)
is taken over, so SIGKILL-and-resume keeps working. A folder holding checkpoints of another
method or model is refused unless the run resumes them.
"""
import json
import logging
import os
import socket
from typing import Optional

from ..errors import UserError
from .checkpoint import list_checkpoints, read_checkpoint_state

logger = logging.getLogger("mindscedit")

LOCK_FILE = ".mindscedit.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _holder(path: str) -> Optional[dict]:
    """The lock's owner, or None when the lock is free or stale (its process gone, on this host)."""
    try:
        with open(path) as f:
            owner = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable or half-written: no run can be relying on it
    if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
        logger.warning("taking over the lock of a run that is gone (pid %s) in %s", owner.get("pid"),
                       os.path.dirname(path))
        return None
    return owner


def check_output_dir_free(output_dir: str) -> None:
    """Refuse (one line) if another running training holds `output_dir`."""
    owner = _holder(os.path.join(output_dir, LOCK_FILE))
    if owner is not None and owner.get("pid") != os.getpid():
        raise UserError(f"output_dir {output_dir} is in use by a running training (pid {owner.get('pid')} on "
                        f"{owner.get('host')}); use another output_dir, or stop that run first (if it is gone, "
                        f"delete {os.path.join(output_dir, LOCK_FILE)})")


def check_checkpoints_fit(output_dir: str, method: str, model: str, resuming: bool) -> None:
    """A fresh run must not mix its checkpoints with another method's or model's."""
    checkpoints = list_checkpoints(output_dir)
    if resuming or not checkpoints:
        return
    state = read_checkpoint_state(checkpoints[-1])  # a damaged one is refused in one line, naming it
    for key, ours in (("method", method), ("model", model)):
        theirs = state.get(key)
        if theirs is not None and theirs != ours:
            raise UserError(f"output_dir {output_dir} holds checkpoints of a run with {key} '{theirs}' (this run: "
                            f"'{ours}'); use another output_dir, or resume them with --resume_from_checkpoint latest")


class OutputLock:
    """Held by the main rank while it trains into `output_dir`."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)

    def __enter__(self):
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:  # O_EXCL: of two runs starting at once, exactly one creates the lock
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                check_output_dir_free(os.path.dirname(self.path))  # refuses if its owner runs
                os.remove(self.path)  # stale: taken over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(owner)
            return self
        raise UserError(f"cannot take the lock {self.path}: another run keeps creating it")

    def __exit__(self, *exc):
        try:
            with open(self.path) as f:
                mine = json.load(f).get("pid") == os.getpid()
        except (OSError, ValueError):
            mine = False
        if mine:
            os.remove(self.path)
