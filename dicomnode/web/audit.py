"""The audit log: every state-changing request (resend, reprocess, STOW-RS), one JSON line
each in ``data_dir/audit.log``, written durably before the answer: who, when, what, from
where. UIDs and counts only, never a patient attribute."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomnode.log import get_logger

log = get_logger("audit")
AUDIT_FILE = "audit.log"
TAIL_BYTES = 256 * 1024  # the latest entries are read from the end of the file only


class AuditLog:
    """Appends entries to ``path`` (fsynced); reads back the latest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, user: str, client: str, action: str, outcome: str,
               **what: Any) -> dict[str, Any]:
        """Write one entry: ``user`` did ``action`` (on ``what``: UIDs, counts) from
        ``client`` (address:port), with ``outcome``."""
        entry = {"time": datetime.fromtimestamp(time.time(), UTC).isoformat(),
                 "user": user, "client": client, "action": action, **what,
                 "outcome": outcome}
        line = (json.dumps(entry, sort_keys=False) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        log.info("audit", **entry)
        return entry

    def latest(self, count: int = 20) -> list[dict[str, Any]]:
        """The last ``count`` entries, newest first."""
        try:
            with self.path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - TAIL_BYTES))
                lines = fh.read().splitlines()[1 if size > TAIL_BYTES else 0:]
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in reversed(lines[-count:]) if line.strip()]
