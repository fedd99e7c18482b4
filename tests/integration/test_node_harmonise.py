"""A series sent with storescu comes out harmonised in the archive; failures stay contained."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.config import load_config
from dicomnode.log import configure
from dicomnode.process import worker as worker_module
from dicomnode.process.worker import Worker
from dicomnode.store.index import Index
from dicomnode.store.ingest import parse_header, receive_instance
from tests.dicom_factory import raw_data, siemens_non_image, write_companions, write_series
from tests.model_factory import make_plain_model
from tests.nodeutil import (
    NodeProcess,
    cli,
    free_port,
    get_series,
    getscu_study,
    scanner_store,
    status,
    storescu,
    wait_for,
    write_config,
)

ROUTES = """
[[routes]]
name = "ct-sharp"
model = "ct-test"
[routes.match]
Modality = "CT"
ConvolutionKernel = "B7*"

[[routes]]
name = "ct-broken"
model = "ct-broken"
[routes.match]
Modality = "CT"
ConvolutionKernel = "B9*"
"""


@pytest.fixture
def setup(tmp_path: Path):
    models = tmp_path / "models"
    make_plain_model(models, "ct-test")
    broken = make_plain_model(models, "ct-broken")
    weights = broken / "weights.pt"
    weights.write_bytes(weights.read_bytes() + b"tampered")
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var",
                          extra_node=f'models_dir = "{models}"', extra=ROUTES)
    return tmp_path, port, config


def derived_rows(config: Path) -> list[dict]:
    return [s for s in status(config).values() if s["kind"] == "derived"]


def receive_files(config, index: Index, files: list[Path]) -> None:
    """Receive ``files`` in-process, as the C-STORE handler does."""
    for path in files:
        data = path.read_bytes()
        receive_instance(data, parse_header(data), index=index,
                         data_dir=config.node.data_dir, root=config.spool_dir,
                         reserve_bytes=0, duplicate_policy="replace")


def queue_series(config, files: list[Path]) -> Index:
    """Receive ``files`` in-process and complete their series: one job is queued."""
    index = Index(config.index_path)
    receive_files(config, index, files)
    assert index.complete_quiet_series(0.0)
    return index


def test_storescu_series_comes_out_harmonised_and_failures_are_contained(setup):
    tmp_path, port, config = setup
    sharp = write_series(tmp_path / "sharp", slices=6, size=32, kernel="B70f", seed=1)
    broken = write_series(tmp_path / "broken", slices=3, size=32, kernel="B90f", seed=2)
    smooth = write_series(tmp_path / "smooth", slices=3, size=32, kernel="B30f", seed=3)
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        for files in (broken, sharp, smooth):
            storescu(port, files)
        uids = {name: str(dcmread(f[0]).SeriesInstanceUID)
                for name, f in (("sharp", sharp), ("broken", broken), ("smooth", smooth))}
        final = {"harmonised", "failed", "unmatched"}
        rows = wait_for(lambda: (s := status(config)) and all(
            s.get(u, {}).get("state") in final for u in uids.values()) and s, 60,
            what="all three series processed")
    finally:
        assert node.stop() == 0
    assert rows[uids["sharp"]]["state"] == "harmonised"
    assert rows[uids["sharp"]]["route"] == "ct-sharp"
    assert rows[uids["smooth"]]["state"] == "unmatched"
    assert rows[uids["broken"]]["state"] == "failed"
    assert "sha256" in rows[uids["broken"]]["error"]
    [derived] = derived_rows(config)
    assert derived["instances"] == 6 and derived["state"] == "archived"
    out = sorted((tmp_path / "var" / "archive").rglob("*.dcm"))
    assert len(out) == 6
    ds, src = dcmread(out[0]), dcmread(sharp[0])
    assert ds.SeriesDescription.endswith("[harmonised: ct-test]")
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(out[0])], capture_output=True, text=True,
                               timeout=60)
        assert "Error" not in check.stderr, check.stderr


def test_job_interrupted_by_crash_reruns_without_duplicates(setup):
    tmp_path, _, config_path = setup
    config = load_config(config_path)
    files = write_series(tmp_path / "sharp", slices=4, size=32, kernel="B70f", seed=5)
    index = queue_series(config, files)
    worker = Worker(config, index)
    assert worker.step()  # first run completes and archives
    def archived() -> dict[str, str]:  # SOP Instance UID -> sha256 of the archived file
        return {str(dcmread(p).SOPInstanceUID): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in config.archive_dir.rglob("*.dcm")}
    first = archived()
    # A crash mid-job: the job was claimed (running) when the node died.
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    with index.transaction() as db:
        db.execute("UPDATE jobs SET state = 'running'")
        db.execute("UPDATE series SET state = 'processing' WHERE series_uid = ?", (uid,))
    assert index.recover(config.node.max_job_attempts)["jobs_requeued"] == 1
    assert worker.step()
    assert not worker.step()  # nothing left
    again = archived()
    assert again == first and len(first) == 4  # the same bytes: nothing replaced or resent
    derived = [r for r in index.all_series(kind="derived")]
    assert len(derived) == 1 and derived[0]["instances"] == 4
    assert index.series(uid)["state"] == "harmonised"


def test_write_sr_archives_an_algorithm_report_beside_the_images(setup):
    tmp_path, port, config_path = setup
    config_path.write_text(config_path.read_text().replace("[node]\n", "[node]\nwrite_sr = true\n"))
    config = load_config(config_path)
    files = write_series(tmp_path / "sharp", slices=3, size=32, kernel="B70f", seed=6)
    index = queue_series(config, files)
    assert Worker(config, index).step()
    derived = index.all_series(kind="derived")
    assert sorted(r["modality"] for r in derived) == ["CT", "SR"]
    source = str(dcmread(files[0]).SeriesInstanceUID)
    assert {r["source_series_uid"] for r in derived} == {source}
    [report] = [p for p in config.archive_dir.rglob("*.dcm") if dcmread(p).Modality == "SR"]
    assert "ct-test" in str(dcmread(report).ContentSequence)


def test_late_instances_while_queued_or_processing_harmonise_and_send_the_whole_series_once(
        setup, monkeypatch):
    tmp_path, _, config_path = setup
    config_path.write_text(config_path.read_text().replace(
        'model = "ct-test"\n', 'model = "ct-test"\nsend_to = ["PACS"]\n')
        + '[[peers]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 9\n')
    config = load_config(config_path)
    files = write_series(tmp_path / "sharp", slices=6, size=32, kernel="B70f", seed=7)
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    index = Index(config.index_path)
    receive_files(config, index, files[:4])
    index.complete_quiet_series(0.0)
    receive_files(config, index, files[4:5])  # arrives while the job is queued
    worker = Worker(config, index)
    assert not worker.step()  # the partial series is not processed
    index.complete_quiet_series(0.0)
    real = worker_module.harmonise_series

    def late_during_processing(*args, **kw):
        receive_files(config, index, files[5:])
        return real(*args, **kw)
    monkeypatch.setattr(worker_module, "harmonise_series", late_during_processing)
    assert worker.step()
    # the five-instance output is superseded: archived, but nothing of it is sent
    assert index.series(uid)["state"] == "receiving"
    assert index.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    monkeypatch.setattr(worker_module, "harmonise_series", real)
    index.complete_quiet_series(0.0)
    assert worker.step()
    assert not worker.step()
    assert index.series(uid)["state"] == "harmonised"
    [derived] = index.all_series(kind="derived")
    assert derived["instances"] == 6
    sends = index.db.execute("SELECT sop_instance_uid FROM outbox").fetchall()
    assert len(sends) == 6
    assert [r["state"] for r in index.jobs()] == ["cancelled", "done", "done"]
    index.close()


def test_unmatched_ignore_deletes_the_originals_once_complete(setup, capsys):
    tmp_path, _, config_path = setup
    config_path.write_text(config_path.read_text().replace(
        "[node]\n", '[node]\nunmatched = "ignore"\n'))
    config = load_config(config_path)
    configure("info")
    kept = write_series(tmp_path / "sharp", slices=3, size=32, kernel="B70f", seed=8)
    dropped = write_series(tmp_path / "smooth", slices=3, size=32, kernel="B30f", seed=9)
    index = Index(config.index_path)
    for path in kept + dropped:
        data = path.read_bytes()
        receive_instance(data, parse_header(data), index=index,
                         data_dir=config.node.data_dir, root=config.spool_dir,
                         reserve_bytes=0, duplicate_policy="replace")
    index.complete_quiet_series(0.0)
    worker = Worker(config, index)
    while worker.step():
        pass
    uid = str(dcmread(dropped[0]).SeriesInstanceUID)
    assert index.series(uid) is None
    assert not index.db.execute("SELECT 1 FROM instances WHERE series_uid = ?",
                                (uid,)).fetchall()
    spool = {p.name for p in config.spool_dir.rglob("*.dcm")}
    assert spool == {f"{dcmread(p).SOPInstanceUID}.dcm" for p in kept}  # matched: kept
    assert index.series(str(dcmread(kept[0]).SeriesInstanceUID))["state"] == "harmonised"
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    [event] = [e for e in events if e["event"] == "series_dropped"]
    assert (event["series_uid"], event["instances"]) == (uid, 3)
    assert event["study_uid"] == str(dcmread(dropped[0]).StudyInstanceUID)
    index.close()


def test_a_job_that_fails_mid_write_leaves_no_staged_files(setup, monkeypatch):
    tmp_path, _, config_path = setup
    config = load_config(config_path)
    files = write_series(tmp_path / "sharp", slices=2, size=32, kernel="B70f", seed=9)
    index = queue_series(config, files)

    def half_written(files, *, out_dir, **kwargs):
        out_dir.mkdir(parents=True)
        (out_dir / "partial.dcm").write_bytes(b"half an image")
        raise OSError("disk went away")

    monkeypatch.setattr(worker_module, "harmonise_series", half_written)
    assert Worker(config, index).step()
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    assert index.series(uid)["state"] == "failed"
    assert "disk went away" in index.series(uid)["error"]
    staging = config.node.data_dir / "staging"
    assert not staging.exists() or not any(staging.rglob("*.dcm"))


def test_a_whole_study_is_kept_and_only_its_images_harmonised(setup):
    """Scanners and PACS send whole studies. What travels with the images (standard and
    private SOP classes) is stored as sent and retrievable with the study, but never
    harmonised, even by a route matching anything."""
    tmp_path, port, config = setup
    config.write_text(config.read_text() + """
[[routes]]
name = "anything"
model = "ct-test"
[routes.match]
PatientID = "*"
""")
    ct = write_series(tmp_path / "in" / "ct", slices=3, size=32)
    companions = write_companions(ct, tmp_path / "in")
    csa = tmp_path / "in" / "csa.dcm"
    siemens_non_image(dcmread(ct[0])).save_as(csa, enforce_file_format=True)
    raw = tmp_path / "in" / "ct" / "raw.dcm"  # in the CT series, as Philips MR puts them
    raw_data(dcmread(ct[0])).save_as(raw, enforce_file_format=True)
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        storescu(port, [*ct, raw, *companions])  # one association
        assert scanner_store(port, [csa]) == [0x0000]  # dcmtk knows no private classes
        sent = {dcmread(p).SeriesInstanceUID: p for p in [*companions, csa]}
        ct_series = dcmread(ct[0]).SeriesInstanceUID
        final = {"harmonised", "unmatched", "failed"}
        rows = wait_for(lambda: (r := status(config)) and all(
            r.get(uid, {}).get("state") in final for uid in [ct_series, *sent]) and r, 90,
            what="every series of the study to be processed")
        assert (rows[ct_series]["state"], rows[ct_series]["instances"]) == ("harmonised", 4)
        # the raw data object set aside (events of the pipeline and the worker)
        assert {e["instances"] for e in node.events("series_harmonised")} == {len(ct)}
        reasons = {e["series_uid"]: e["reason"] for e in node.events("series_unmatched")}
        expected = {"seg.dcm": "Segmentation Storage",
                    "kos.dcm": "Key Object Selection Document Storage",
                    "rtstruct.dcm": "RT Structure Set Storage",
                    "reportsi.dcm": "Basic Text SR Storage", "rtdose.dcm": "RT Dose Storage",
                    "csa.dcm": "Siemens CSA Non-Image Storage"}
        for uid, path in sent.items():
            assert rows[uid]["state"] == "unmatched" and rows[uid]["instances"] == 1
            assert reasons[uid] == f"not harmonisable: {expected[path.name]}"
            [stored] = (tmp_path / "var" / "spool").rglob(f"{dcmread(path).SOPInstanceUID}.dcm")
            # (storescu re-encodes sequence lengths, so equal as data sets, not as bytes)
            assert dcmread(stored) == dcmread(path)
        got = tmp_path / "got"
        proc = getscu_study(port, dcmread(ct[0]).StudyInstanceUID, got)
        assert proc.returncode == 0, proc.stderr
        back = {str(dcmread(p).SOPInstanceUID) for p in got.iterdir()}
        # the originals, companions included, and the harmonised copy of the CT series
        assert {str(dcmread(p).SOPInstanceUID) for p in [*ct, raw, *companions]} <= back
        assert len(back) == len(ct) * 2 + 1 + len(companions)
        # the private object comes back to an SCU that takes its class
        sent_csa = dcmread(csa)
        [got_csa] = get_series(port, sent_csa.StudyInstanceUID, sent_csa.SeriesInstanceUID,
                               sent_csa.SOPClassUID)
        assert got_csa == sent_csa
    finally:
        node.stop()


def test_reprocess_runs_failed_harmonisations_again_once_their_cause_is_gone(setup):
    """A series whose model folder was broken fails; once the folder is fixed,
    ``dicomnode reprocess --failed`` harmonises it; reprocessing a harmonised series writes
    the same derived series (same UIDs) and sends nothing again."""
    tmp_path, port, config = setup
    broken = write_series(tmp_path / "broken", slices=3, size=32, kernel="B90f", seed=8)
    uid = str(dcmread(broken[0]).SeriesInstanceUID)
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        storescu(port, broken)
        wait_for(lambda: status(config).get(uid, {}).get("state") == "failed", 60,
                 what="the series to fail on its broken model")
        make_plain_model(tmp_path / "models", "ct-broken")  # the folder is fixed
        out = cli("reprocess", "--failed", "--config", str(config))
        assert out.stdout.strip() == "1 series queued for harmonisation"
        wait_for(lambda: status(config)[uid]["state"] == "harmonised", 60,
                 what="the reprocessed series to be harmonised")
        [derived] = derived_rows(config)
        again = cli("reprocess", "--series", uid, "--config", str(config))
        assert again.stdout.strip() == "1 series queued for harmonisation"
        wait_for(lambda: len([e for e in node.events("series_harmonised")
                              if e["component"] == "worker"]) == 2, 60, what="the second run")
        [rerun] = derived_rows(config)
        assert rerun["series_uid"] == derived["series_uid"]
        assert rerun["instances"] == derived["instances"]
        refused = cli("reprocess", "--series", derived["series_uid"], "--config", str(config),
                      check=False)
        assert refused.returncode == 2
        assert refused.stderr.strip().endswith("is a harmonised series: reprocess the original"
                                               " it came from")
        unknown = cli("reprocess", "--series", "1.2.3.4", "--config", str(config), check=False)
        assert unknown.returncode == 2 and "is not in the index" in unknown.stderr
        assert cli("reprocess", "--failed", "--config", str(config)).stdout.startswith("0 ")
    finally:
        assert node.stop() == 0
