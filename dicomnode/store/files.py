"""Spool storage: an instance is on disk for good before anyone is told Success.

Files are written with :func:`pipelines.files.atomic_write` (temporary file, flush,
rename, folder fsync), or, when already written where they arrived, flushed and renamed
into place the same way (:func:`move_into_place`); newly created folders are fsynced into
their parents too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipelines.files import TMP_PREFIX, atomic_write, commit, fsync_dir

_SAFE_NAME = re.compile(r"[0-9A-Za-z._-]{1,128}")


class StorageFull(OSError):
    """Free space is below the configured reserve: refuse, keep running."""


@dataclass(frozen=True)
class StoredFile:
    path: Path
    size: int
    sha256: str


def ensure_dir(path: Path) -> None:
    """Create ``path`` and any missing parents, each made durable in its parent."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def store_bytes(path: Path, data: bytes, sha256: str | None = None) -> StoredFile:
    """Write ``data`` durably to ``path`` (creating its folders durably too); ``sha256``
    is the caller's digest of ``data`` where it has one already."""
    ensure_dir(path.parent)
    atomic_write(path, lambda fh: fh.write(data))
    return StoredFile(path, len(data), sha256 or hashlib.sha256(data).hexdigest())


def move_into_place(source: Path, path: Path) -> None:
    """Make a file written elsewhere on the same file system durable as ``path``: flush
    it, then rename it there (creating its folders durably too)."""
    fd = os.open(source, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    ensure_dir(path.parent)
    commit(source, path)


def check_free_space(path: Path, needed: int, reserve_bytes: int) -> None:
    """Raise :class:`StorageFull` unless ``needed`` bytes fit above the reserve."""
    ensure_dir(path)
    free = shutil.disk_usage(path).free
    if free - needed < reserve_bytes:
        raise StorageFull(f"{free // 2**20} MiB free at {path}, reserve is"
                          f" {reserve_bytes // 2**20} MiB")


def path_component(uid: str) -> str:
    """A file or folder name for a UID as received: itself where it is made of letters,
    digits, dots, dashes and underscores (every conformant UID, and the common
    non-conformant ones such as a leading zero), else a digest of it, so no value can
    traverse out of the spool or collide with another."""
    value = str(uid).strip().rstrip("\x00")
    if _SAFE_NAME.fullmatch(value) and not value.startswith("."):
        return value
    return "u" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def instance_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance lives: ``root/<study>/<series>/<sop>.dcm``."""
    return (root / path_component(study_uid) / path_component(series_uid)
            / f"{path_component(sop_uid)}.dcm")


def leftover_temp_files(root: Path) -> list[Path]:
    """Temporary files a crash left behind; they were never acknowledged."""
    return sorted(root.rglob(f"{TMP_PREFIX}*")) if root.exists() else []
