"""Writing files so that a crash, a kill or a full disk at any instant leaves the old file or the new one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"

# What every path argument of jaxmnist accepts.
PathArg = str | os.PathLike


def _current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_atomically(path: PathArg, content: bytes) -> None:
    """Temporary file in the same folder, fsync, rename, fsync the folder: all or nothing.

    Args:
        path: the file to (re)place.
        content: its new bytes.

    Raises:
        OSError: the write failed (e.g. no space left); ``path`` is as it was and no temporary file is left.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> write_atomically(path, b"hello")
        >>> path.read_bytes()
        b'hello'
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(handle, "wb") as output:
            output.write(content)
            output.flush()
            os.fsync(output.fileno())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def remove_temporary_files(folder: PathArg, name_prefix: str) -> list[Path]:
    """Deletes what interrupted ``write_atomically`` calls left in ``folder`` for files named ``name_prefix*``."""
    folder = Path(folder)
    leftovers = sorted(folder.glob(f".{name_prefix}*{TEMPORARY_SUFFIX}")) if folder.is_dir() else []
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def reason(error: OSError) -> str:
    """The system's reason for ``error`` in words, e.g. ``no space left on device``."""
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]
