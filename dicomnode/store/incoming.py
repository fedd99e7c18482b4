"""Data sets being received: the files pynetdicom writes C-STORE data sets into as their
fragments arrive (``data_dir/incoming``), accounted for until they are stored or dropped.

Every such file belongs to the association it arrives on. Its writes are checked against
the disk reserve as they happen, so a large instance cannot fill the disk below
``disk_reserve_mb`` before the C-STORE handler could see it: the write that would cross
the reserve ends the file there and drops the rest of the data set, and the C-STORE is
answered Out of Resources (:meth:`IncomingFiles.refusal`); a write that fails (the disk
full, an I/O error) does the same and aborts the association with A-ABORT, since the node
cannot tell what else failed. When an association ends, however it ends (release, abort,
TCP reset, a guard's cut), what is left of its files is deleted: only a data set the
handler moved into the spool survives it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from dicomnode.log import get_logger
from dicomnode.net import compat
from dicomnode.store.files import StorageFull

log = get_logger("incoming")


class IncomingFile:
    """One data set being written: pynetdicom's ``write``, ``file.flush``, ``name`` and
    ``close``; a failed write closes and deletes it, aborts the association, and drops
    the rest of the data set. Its SHA-256 is taken as the bytes pass (pynetdicom writes
    the file front to back), so the stored file need not be read again for it."""

    def __init__(self, files: IncomingFiles, raw: Any, assoc: Any) -> None:
        self._files, self._raw, self._assoc = files, raw, assoc
        self.name = raw.name
        self.failed = False
        self.digest = hashlib.sha256()
        self.size = 0

    @property
    def file(self) -> IncomingFile:
        return self  # pynetdicom flushes ``.file``

    def write(self, data: bytes) -> int:
        if self.failed:
            return len(data)
        try:
            self._files.check_room(len(data))
        except StorageFull as exc:
            self._fail(exc, abort=False)
            return len(data)
        try:
            written = self._raw.write(data)
        except OSError as exc:
            self._fail(exc)
            return len(data)
        self.digest.update(data)
        self.size += written
        return written

    def flush(self) -> None:
        if not self.failed:
            try:
                self._raw.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        try:
            self._raw.close()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError, abort: bool = True) -> None:
        """Stop writing: the file is deleted, the C-STORE refused, and (for a write that
        failed rather than one refused for room) the association aborted."""
        self.failed = True
        reason = str(exc) if isinstance(exc, StorageFull) else f"{exc.strerror or exc}"
        self._files.refuse(self.name, reason)
        log.error("instance_receive_failed", file=Path(self.name).name,
                  error_type=type(exc).__name__, reason=reason, aborted=abort)
        try:
            self._raw.close()
        except OSError:
            pass
        Path(self.name).unlink(missing_ok=True)
        if abort and self._assoc is not None:
            compat.abort_from_reactor(self._assoc)


class IncomingFiles:
    """The incoming folder of a running node: its files by association."""

    def __init__(self, folder: Path, reserve_bytes: int) -> None:
        self.folder, self.reserve_bytes = folder, reserve_bytes
        self._lock = threading.Lock()
        self._by_association: dict[Any, list[Path]] = defaultdict(list)
        self._open: dict[str, IncomingFile] = {}
        self._refused: dict[str, str] = {}  # file -> why it was not written whole
        self._room, self._looked = -1, 0.0  # bytes above the reserve at the last look

    def open(self, **kwargs: Any) -> IncomingFile:
        """What pynetdicom calls for each data set it receives (``NamedTemporaryFile``'s
        arguments); the file is registered to the association receiving it."""
        raw = tempfile.NamedTemporaryFile(dir=self.folder, prefix=compat.INCOMING_PREFIX,
                                          **kwargs)  # noqa: SIM115 - closed by pynetdicom
        assoc = compat.receiving_association()
        incoming = IncomingFile(self, raw, assoc)
        with self._lock:
            self._by_association[assoc].append(Path(raw.name))
            self._open[raw.name] = incoming
        return incoming

    def check_room(self, size: int) -> None:
        """Raise :class:`StorageFull` when writing ``size`` bytes would leave less free
        than the reserve. The free space is asked of the file system again once what was
        left above the reserve at the last look is used up, or a second has passed (other
        writers share the disk): one ``statvfs`` per second or so, not one per fragment."""
        with self._lock:
            self._room -= size
            if self._room >= 0 and time.monotonic() - self._looked < 1.0:
                return
        free = shutil.disk_usage(self.folder).free
        with self._lock:
            self._room, self._looked = free - self.reserve_bytes - size, time.monotonic()
            if self._room >= 0:
                return
        raise StorageFull(f"{free // 2**20} MiB free at {self.folder}, reserve is"
                          f" {self.reserve_bytes // 2**20} MiB")

    def refuse(self, name: str, reason: str) -> None:
        with self._lock:
            self._refused[str(name)] = reason

    def refusal(self, path: Path | str) -> str | None:
        """Why the data set received into ``path`` was not written whole, or None."""
        with self._lock:
            return self._refused.pop(str(path), None)

    def written(self, path: Path | str) -> tuple[str, int] | None:
        """The SHA-256 and size of the data set received into ``path`` (taken as it was
        written), or None for a file these did not open."""
        with self._lock:
            incoming = self._open.pop(str(path), None)
        return None if incoming is None else (incoming.digest.hexdigest(), incoming.size)

    def discard(self, assoc: Any) -> int:
        """Delete what is left of ``assoc``'s files (moved ones are gone already); how many
        were deleted."""
        with self._lock:
            paths = self._by_association.pop(assoc, [])
            for path in paths:
                self._refused.pop(str(path), None)
                self._open.pop(str(path), None)
        removed = 0
        for path in paths:
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            log.warning("partial_instances_removed", files=removed)
        return removed
