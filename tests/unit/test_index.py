"""The index's series and job state machine, without a network."""

from __future__ import annotations

from pathlib import Path

from dicomnode.dispatch import outbox
from dicomnode.store.index import Index
from dicomnode.store.ingest import parse_header
from tests.dicom_factory import write_series


def add(index: Index, files: list[Path], kind: str = "original", **kw) -> str:
    for f in files:
        data = f.read_bytes()
        rec = parse_header(data)
        index.add_instance(rec, f.name, len(data), "sha-" + f.name, kind=kind, **kw)
    return rec.series_uid


def jobs(index: Index) -> list[tuple[str, str]]:
    return [(r["series_uid"], r["state"]) for r in index.jobs()]


def test_late_instance_cancels_the_queued_job_and_the_series_is_processed_once_whole(
        index, tmp_path):
    files = write_series(tmp_path / "s", slices=5, size=8)
    uid = add(index, files[:4])
    assert index.complete_quiet_series(0.0) == [(uid, 4)]
    assert jobs(index) == [(uid, "queued")]
    assert add(index, files[4:]) == uid  # a late instance before the worker got to it
    assert index.series(uid)["state"] == "receiving"
    assert jobs(index) == [(uid, "cancelled")]
    assert index.claim_job() is None  # never harmonised half-received
    assert index.complete_quiet_series(0.0) == [(uid, 5)]
    job = index.claim_job()
    assert job is not None and job.series_uid == uid
    assert index.series(uid)["state"] == "processing"
    assert index.claim_job() is None
    assert jobs(index) == [(uid, "cancelled"), (uid, "running")]


def test_a_queued_job_of_a_series_receiving_again_is_not_claimed(index, tmp_path):
    uid = add(index, write_series(tmp_path / "s", slices=2, size=8))
    index.complete_quiet_series(0.0)
    index.set_series_state(uid, "receiving")  # e.g. an index written by an older version
    assert index.claim_job() is None
    assert jobs(index) == [(uid, "queued")]
    index.set_series_state(uid, "queued")
    assert index.claim_job().series_uid == uid


def test_sends_are_not_queued_for_an_output_whose_source_reopened(index, tmp_path):
    source = add(index, write_series(tmp_path / "s", slices=2, size=8, seed=1))
    derived = add(index, write_series(tmp_path / "d", slices=2, size=8, seed=2),
                  kind="derived")
    index.set_series_state(derived, "archived", source_series_uid=source)
    index.set_series_state(source, "receiving")
    assert outbox.enqueue_series(index, derived, ["PACS"]) == 0
    index.set_series_state(source, "harmonised")
    assert outbox.enqueue_series(index, derived, ["PACS"]) == 2


def test_a_job_interrupted_max_attempts_times_fails_instead_of_looping(index, tmp_path):
    uid = add(index, write_series(tmp_path / "s", slices=2, size=8))
    index.complete_quiet_series(0.0)
    for attempt in (1, 2):
        assert index.claim_job().attempts == attempt  # then the process dies under it
        assert index.recover(max_attempts=3)["jobs_requeued"] == 1
        assert index.series(uid)["state"] == "queued"
    assert index.claim_job().attempts == 3
    recovered = index.recover(max_attempts=3)
    assert recovered["jobs_requeued"] == 0 and recovered["jobs_given_up"] == [uid]
    assert jobs(index) == [(uid, "failed")]
    series = index.series(uid)
    assert (series["state"], series["error"]) == ("failed", "interrupted 3 times")
    assert index.claim_job() is None
