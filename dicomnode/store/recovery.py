"""Start-up recovery: bring the spool, the archive and the index back in step after a crash,
and the clean-stop mark that lets a start after a clean stop skip that walk."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dicomnode.config import Config
from dicomnode.log import get_logger
from dicomnode.store.files import leftover_temp_files
from dicomnode.store.index import Index
from dicomnode.store.ingest import RejectedInstance, parse_header
from pipelines.files import atomic_write, fsync_dir

log = get_logger("service")

# Written by a stop that drained every association, job and scheduled task: the spool,
# archive and index then agree, and the next start need not walk them (see reconcile)
CLEAN_STOP = "clean-stop"


def take_clean_stop(data_dir: Path) -> bool:
    """Whether the last node on ``data_dir`` stopped cleanly. The mark is removed, durably,
    before anything else happens: should this run crash, its start-up walks the spool."""
    try:
        (data_dir / CLEAN_STOP).unlink()
    except FileNotFoundError:
        return False
    fsync_dir(data_dir)
    return True


def mark_clean_stop(data_dir: Path) -> None:
    atomic_write(data_dir / CLEAN_STOP, lambda fh: fh.write(b"stopped cleanly\n"))


def reconcile(index: Index, config: Config, walk: bool = True) -> dict[str, int]:
    """Bring the spool, the archive and the index back in step after a crash.

    A temporary file in the spool, or a data set left in the incoming folder, was never
    acknowledged, one in the archive was never indexed (its job is rerun and writes it
    again): remove them. An unindexed whole file whose SOP Instance UID is indexed under
    another name is a replacement that was never indexed (so never acknowledged) or the
    copy a committed replacement superseded: the index is right, remove it. A whole
    spool file whose UID is not indexed at all was renamed into place just before the
    crash, also unacknowledged, but its bytes are whole, so index it rather than throw
    it away (the peer will resend it and the duplicate policy makes that harmless).

    After a clean stop (``walk=False``) none of that can be there, and walking millions of
    files would only delay listening: just the incoming folder is emptied.
    """
    data_dir, spool = config.node.data_dir, config.spool_dir
    removed = superseded = adopted = 0
    incoming = sorted(config.incoming_dir.iterdir()) if config.incoming_dir.exists() else []
    walked = (spool, config.archive_dir) if walk else ()
    for tmp in [*(t for root in walked for t in leftover_temp_files(root)),
                *(p for p in incoming if p.is_file())]:
        tmp.unlink(missing_ok=True)
        removed += 1
    known = index.known_paths() if walk else set()
    for root in walked:
        for path in (root.rglob("*.dcm") if root.exists() else ()):
            rel = str(path.relative_to(data_dir))
            if rel in known:
                continue
            data = path.read_bytes()
            try:
                record = parse_header(data)
            except RejectedInstance as exc:
                log.warning("spool_file_unreadable", path=rel, reason=str(exc))
                continue
            if index.instance(record.sop_instance_uid) is not None:
                path.unlink()
                superseded += 1
            elif root == spool:
                index.add_instance(record, rel, len(data), hashlib.sha256(data).hexdigest())
                adopted += 1
    return {"temp_removed": removed, "superseded_removed": superseded,
            "files_adopted": adopted}
