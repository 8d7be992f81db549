"""Checkpoints that are either complete or absent.

A checkpoint is a folder `checkpoint-<step>` holding the method's weights (loadable on their own),
`training_state.safetensors` (trainable weights, the optimizer's state, loss scale, and with
use_ema the averaged weights, `ema/<weight path>`) and,
written last, `state.json`. It is written under a temporary name and renamed into place only
when complete, so a crash, a kill or a full disk mid-save leaves the previous checkpoint intact.
"""
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

import mindspore as ms
from safetensors import SafetensorError
from safetensors.numpy import save_file

from ..errors import UserError
from ..tuners.weights_file import read_weights

logger = logging.getLogger("mindscedit")

STATE_FILE = "state.json"
TRAINING_STATE_FILE = "training_state.safetensors"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


class CheckpointSaveError(UserError):
    """A save failed (full disk, no permission, ...); whatever was there before is untouched."""


# Test hook: a save whose folder name equals this variable sleeps once its files are complete and
# before the rename, so tests can kill the process at that exact moment. Unset in normal use.
PAUSE_IN_SAVE_ENV = "MINDSCEDIT_TEST_PAUSE_IN_SAVE"


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the rename itself durable
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(final_path: str):
    """Yield a temporary folder; on success it replaces `final_path` in one rename.

    Any I/O error on the way (e.g. ENOSPC) removes the temporary folder and becomes one
    CheckpointSaveError line; `final_path` and everything else in its parent stay as they were.
    """
    parent = os.path.dirname(os.path.abspath(final_path))
    name = os.path.basename(final_path)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        yield tmp
        _fsync_tree(tmp)
        if os.environ.get(PAUSE_IN_SAVE_ENV) == name:
            time.sleep(3600)
        if os.path.exists(final_path):
            old = f"{tmp}.old"
            os.rename(final_path, old)
            os.rename(tmp, final_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final_path)
        _fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):  # safetensors wraps its I/O errors
            reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())
            raise CheckpointSaveError(f"cannot save {name} in {parent}: {reason}; nothing there was replaced") from exc
        raise


def remove_stale_temporaries(output_dir: str) -> None:
    """Temporary folders left by a killed save are never complete: remove them.

    One exception: a save killed between its two renames leaves the folder it was replacing as
    `.<name>.tmp-<pid>.old` and no `<name>`; that folder is complete, so it is put back.
    """
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if not (name.startswith(".") and ".tmp-" in name):
            continue
        path = os.path.join(output_dir, name)
        final = os.path.join(output_dir, name[1:].split(".tmp-")[0])
        if name.endswith(".old") and not os.path.exists(final):
            os.rename(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoints (those with state.json), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def prune_checkpoints(output_dir: str, total_limit: Optional[int]) -> None:
    """Keep the newest `total_limit` complete checkpoints; the newest is never removed."""
    if not total_limit:
        return
    checkpoints = list_checkpoints(output_dir)
    for path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """'latest' -> newest complete checkpoint in output_dir (None if there is none yet)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, resume_from_checkpoint)
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise UserError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a complete checkpoint")
    return path


EMA_PREFIX = "ema/"


def _named_state_parameters(train_step) -> Dict[str, ms.Parameter]:
    """Everything that changes during training: trainable weights, the optimizer's state (as it
    declares it: see optimizers.py), the loss scaler's and the EMA of the weights (if kept).

    Keys use each weight's path in the training network (Parameter.name depends on how Cells
    were wrapped).
    """
    paths = {id(p): name for name, p in train_step.model.parameters_and_names()}
    optimizer = train_step.optimizer
    params = dict(optimizer.scalar_state())
    slots = optimizer.state_slots()
    ema = getattr(train_step, "ema", None)
    for i, p in enumerate(optimizer.parameters):
        name = paths[id(p)]
        params[f"param/{name}"] = p
        for slot, tensors in slots.items():
            params[f"{slot}/{name}"] = tensors[i]
        if ema is not None:
            params[f"{EMA_PREFIX}{name}"] = ema.averages[i]
    params.update(train_step.loss_scaler_state())
    return params


def save_training_state(folder: str, train_step, state: dict) -> None:
    arrays = {key: p.asnumpy() for key, p in _named_state_parameters(train_step).items()}
    save_file(arrays, os.path.join(folder, TRAINING_STATE_FILE))
    with open(os.path.join(folder, STATE_FILE), "w") as f:  # written last: marks the folder complete
        json.dump(state, f, indent=2)


def read_checkpoint_state(folder: str, method: Optional[str] = None, optimizer: Optional[str] = None) -> dict:
    """The checkpoint's state.json, checked to parse and to fit this run's method and optimizer:
    what can be refused before any model loads."""
    try:
        with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            raise ValueError("no global_step")
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {folder}: {STATE_FILE} is unreadable ({' '.join(str(err).split())}); resume "
                        "from an earlier checkpoint") from None
    if method and state.get("method", method) != method:
        raise UserError(f"checkpoint {folder} was saved by a '{state['method']}' run; this run trains '{method}'")
    # Checkpoints written before the optimizer was a setting are AdamW's.
    if optimizer and state.get("optimizer", "adamw") != optimizer:
        raise UserError(f"checkpoint {folder} holds '{state['optimizer']}' optimizer state; this run uses "
                        f"'{optimizer}' (resume with --optimizer {state['optimizer']})")
    return state


def load_training_state(folder: str, train_step, method: Optional[str] = None, optimizer: Optional[str] = None) -> dict:
    """Restore weights, optimizer and loss scaler from `folder`; returns its state.json.

    Everything is checked before anything is set: a checkpoint that does not fit (another method
    or model), does not parse or holds a non-finite value raises one line and leaves the weights
    as they were.
    """
    state = read_checkpoint_state(folder, method, optimizer)
    file = os.path.join(folder, TRAINING_STATE_FILE)
    if not os.path.isfile(file):
        raise UserError(f"checkpoint {folder} has no {TRAINING_STATE_FILE}")
    arrays, _ = read_weights(file)  # every tensor parsed and finite, before anything is set
    params = _named_state_parameters(train_step)
    _start_missing_ema_from_weights(arrays, params, folder)
    for key, param in params.items():
        if key not in arrays:
            raise UserError(f"{file}: missing '{key}' (was it saved by another method or model?)")
        if tuple(arrays[key].shape) != tuple(param.shape):
            raise UserError(f"{file}: '{key}' has shape {arrays[key].shape}, expected {tuple(param.shape)}")
    for key, param in params.items():
        param.set_data(ms.Tensor(arrays[key], param.dtype))
    return state


def _start_missing_ema_from_weights(arrays: dict, params: dict, folder: str) -> None:
    """A checkpoint saved without use_ema, resumed with it: the average starts from the checkpoint's weights
    (as a new run's starts from its first weights). One saved with some averages missing is refused as usual."""
    ema_keys = [key for key in params if key.startswith(EMA_PREFIX)]
    if not ema_keys or any(key in arrays for key in ema_keys):
        return
    logger.warning("checkpoint %s holds no EMA of the weights (saved without use_ema): the average starts from "
                   "its weights", folder)
    for key in ema_keys:
        weight = "param/" + key[len(EMA_PREFIX):]
        if weight in arrays:
            arrays[key] = arrays[weight]
