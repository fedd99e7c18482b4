"""Archive retention: originals purged after ``original_retention_days``, harmonised kept."""

from __future__ import annotations

import time
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from dicomnode.config import load_config
from dicomnode.store import archive
from dicomnode.store.index import Index
from dicomnode.store.lookup import find
from dicomnode.store.query import Key, Query
from tests.dicom_factory import write_series
from tests.nodeutil import free_port, wait_for, write_config
from tests.orthanc import seed_series


def setup(tmp_path: Path, retention: float = 30.0, interval: float = 1.0):
    config = write_config(tmp_path / "node.toml", free_port(), tmp_path / "var",
                          extra=f"[archive]\noriginal_retention_days = {retention}\n"
                          f"purge_interval_hours = {interval}\n")
    old = seed_series(config, write_series(tmp_path / "old", slices=3, size=16, seed=1),
                      kind="original")
    busy = seed_series(config, write_series(tmp_path / "busy", slices=2, size=16, seed=2),
                       kind="original")
    derived = seed_series(config, write_series(tmp_path / "derived", slices=2, size=16,
                                               seed=3), source_series_uid=old)
    cfg = load_config(config)
    index = Index(cfg.index_path)
    index.set_series_state(old, "harmonised")
    index.set_series_state(busy, "processing")
    return cfg, index, old, busy, derived


def test_purge_removes_expired_originals_only(tmp_path):
    cfg, index, old, busy, derived = setup(tmp_path)
    spool = list((tmp_path / "var" / "spool").rglob("*.dcm"))
    assert len(spool) == 5
    assert archive.purge_originals(cfg, index) == {"series": 0, "instances": 0}  # not yet
    later = time.time() + 31 * 86400
    assert archive.purge_originals(cfg, index, now=later) == {"series": 1, "instances": 3}
    assert index.series(old) is None and index.series(busy) is not None
    assert index.series(derived)["state"] == "archived"  # harmonised copies are kept
    left = list((tmp_path / "var" / "spool").rglob("*.dcm"))
    assert len(left) == 2 and all(busy in str(p) for p in left)
    assert not (tmp_path / "var" / "spool" / left[0].parent.parent.name / old).exists()
    assert len(list((tmp_path / "var" / "archive").rglob("*.dcm"))) == 2
    # gone from Query/Retrieve too
    q = Query("SERIES", (Key("SeriesInstanceUID", "UI", ""),))
    assert {r["SeriesInstanceUID"] for r in find(index, q)} == {busy, derived}
    index.close()


def test_purge_is_scheduled_and_runs_at_start(tmp_path):
    cfg, index, old, busy, derived = setup(tmp_path, retention=1e-6)  # ~0.1 s
    time.sleep(0.2)
    scheduler = BackgroundScheduler(timezone="UTC")
    archive.schedule(scheduler, cfg, index)
    assert scheduler.get_job("archive-purge").trigger.interval.total_seconds() == 3600
    scheduler.start()
    try:
        wait_for(lambda: index.series(old) is None, 10, what="scheduled purge")
    finally:
        scheduler.shutdown(wait=True)
    assert index.series(busy) is not None
    index.close()
