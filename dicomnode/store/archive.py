"""The archive: harmonised series are kept; originals are kept for a retention period.

Harmonised (derived) series live under ``data_dir/archive`` and are never purged here.
Originals stay in ``data_dir/spool`` (where they were received) and stay queryable and
retrievable until ``[archive] original_retention_days`` after their last instance
arrived; :func:`purge_originals`, scheduled every ``purge_interval_hours``, then deletes
their files and index rows. A series still receiving, queued or processing is never
purged. Index rows are deleted in one transaction that re-checks the state (a series
re-opened by a new instance meanwhile is kept), then the files. A crash between the
two leaves unindexed files that start-up reconciliation adopts as received again: the
series is re-harmonised into the same deterministic UIDs and bytes, which the outbox
recognises as already sent, so the only effect is one more retention period.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomnode.config import Config
from dicomnode.log import get_logger
from dicomnode.store.index import FINISHED_JOBS, Index, SeriesState

log = get_logger("archive")

PURGEABLE = (SeriesState.HARMONISED, SeriesState.UNMATCHED, SeriesState.IGNORED,
             SeriesState.SENT, SeriesState.FAILED, SeriesState.ARCHIVED)


def expired_originals(index: Index, retention_days: float, now: float) -> list[Any]:
    cutoff = now - retention_days * 86400
    return index.db.execute(
        f"SELECT * FROM series WHERE kind = 'original' AND last_received <= ?"
        f" AND state IN ({', '.join('?' * len(PURGEABLE))}) ORDER BY last_received",
        (cutoff, *PURGEABLE)).fetchall()


def _prune_dirs(start: Path, stop: Path) -> None:
    """Remove folders left empty, from ``start`` up to (not including) ``stop``."""
    d = start
    while d != stop and stop in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


def drop_series(config: Config, index: Index, uid: str, states: Sequence[str]) -> int | None:
    """Delete a series' index rows (one transaction that re-checks it is still in one of
    ``states``), then its files; the number of instances, or None if it was kept (a new
    instance re-opened it meanwhile)."""
    data_dir = config.node.data_dir
    with index.transaction() as db:
        state = db.execute("SELECT state FROM series WHERE series_uid = ?", (uid,)).fetchone()
        if state is None or state["state"] not in states:
            return None
        paths = [data_dir / r["path"] for r in db.execute(
            "SELECT path FROM instances WHERE series_uid = ?", (uid,))]
        db.execute("DELETE FROM instances WHERE series_uid = ?", (uid,))
        db.execute("DELETE FROM jobs WHERE series_uid = ? AND state IN (?, ?, ?)",
                   (uid, *FINISHED_JOBS))
        db.execute("DELETE FROM series WHERE series_uid = ?", (uid,))
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        _prune_dirs(paths[0].parent, data_dir)
    return len(paths)


def purge_originals(config: Config, index: Index, now: float | None = None) -> dict[str, int]:
    """Delete originals older than the retention; returns series and instance counts."""
    now = time.time() if now is None else now
    series = instances = 0
    for s in expired_originals(index, config.archive.original_retention_days, now):
        dropped = drop_series(config, index, s["series_uid"], PURGEABLE)
        if dropped is None:
            continue  # re-opened by a new instance meanwhile: keep it
        series += 1
        instances += dropped
        log.info("original_purged", series_uid=s["series_uid"], study_uid=s["study_uid"],
                 instances=dropped, state=s["state"],
                 age_days=round((now - s["last_received"]) / 86400, 3))
    if series:
        log.info("archive_purge_done", series=series, instances=instances)
    return {"series": series, "instances": instances}


def schedule(scheduler: Any, config: Config, index: Index) -> None:
    """Run the purge now and then every ``purge_interval_hours``."""
    scheduler.add_job(purge_originals, "interval", args=[config, index],
                      seconds=config.archive.purge_interval_hours * 3600, id="archive-purge",
                      max_instances=1, coalesce=True, next_run_time=datetime.now(UTC))
