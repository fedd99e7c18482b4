"""Crash-safe file writes shared by the model folder, the derived-series writer and the spool.

Write a temporary file in the destination folder, flush it to disk, rename it over the
final name (atomic on POSIX), then fsync the folder so the rename itself survives a power
cut. A reader, or a reboot, sees the whole file or none of it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path, sync_folder: bool = True) -> None:
    """Rename a flushed file over ``path`` (same file system), then fsync the folder so the
    rename survives a power cut (``sync_folder=False``: the caller does, once for many
    files); ``tmp`` is removed if the rename fails."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[BinaryIO], object],
                 sync_folder: bool = True) -> None:
    """Call ``write(file)`` on a temporary file, then make it durable as ``path`` (its name
    once the folder is fsynced: here, unless ``sync_folder`` is False)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fdatasync(fh.fileno())  # data and size; rename + folder fsync make the name
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    commit(Path(tmp), path, sync_folder)
