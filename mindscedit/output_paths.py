"""Output paths checked before any work: a run must not find out after minutes that it cannot write."""
import os
import tempfile

from .errors import UserError


def check_output_path(path: str, flag: str, folder: bool = True) -> None:
    """Fail in one line, before any work, if `path` cannot be written as a folder (or as a file, whose
    folder is then created)."""
    target = os.path.abspath(path)
    if folder and os.path.isfile(target):
        raise UserError(f"{flag} {path} is a file, not a folder")
    if not folder and os.path.isdir(target):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    existing = os.path.dirname(target) if not folder else target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path} cannot be created: {existing} is a file")
    # A real probe, not os.access: root passes os.access everywhere, yet cannot write to a
    # read-only mount or to /proc.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mindscedit-write-check-", dir=existing))
    except OSError as error:
        raise UserError(f"{flag} {path} cannot be written: {existing}: {error.strerror}") from None
    if not folder:  # a file's writer expects its folder; a folder's writer makes it itself
        os.makedirs(os.path.dirname(target), exist_ok=True)
