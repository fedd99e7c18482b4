"""``dicomnode serve`` start-up: a start that cannot run changes nothing and says why."""

from __future__ import annotations

import signal
import socket
import sqlite3
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.config import load_config
from dicomnode.store.index import Index
from dicomnode.store.sends import SendState
from tests.dicom_factory import write_series
from tests.nodeutil import NodeProcess, cli, free_port, status, storescu, wait_for, write_config
from tests.orthanc import seed_series


def test_second_serve_on_the_same_data_dir_refuses_and_the_first_keeps_working(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var")
    other = write_config(tmp_path / "other.toml", free_port(), tmp_path / "var")
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        files = write_series(tmp_path / "in", slices=3, size=16)
        storescu(port, files[:2])
        second = cli("serve", "--config", str(other), check=False)
        assert second.returncode != 0
        assert second.stderr.strip() == (f"dicomnode serve: error: another dicomnode is using"
                                         f" {tmp_path / 'var'}")
        storescu(port, files[2:])
        uid = str(dcmread(files[0]).SeriesInstanceUID)
        series = wait_for(lambda: (s := status(config).get(uid)) and s["state"] != "receiving"
                          and s, 30, what="series to complete on the first node")
    finally:
        assert node.stop() == 0
    assert series["instances"] == 3
    assert len(node.events("node_recovered")) == 1


def test_serve_that_cannot_listen_leaves_recoverable_state_untouched(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var",
                          extra='[[peers]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 9\n')
    queued = seed_series(config, write_series(tmp_path / "a", slices=2, size=16, seed=1),
                         kind="original")
    running = seed_series(config, write_series(tmp_path / "b", slices=2, size=16, seed=2),
                          kind="original")
    seed_series(config, write_series(tmp_path / "d", slices=2, size=16, seed=3),
                send_to=("PACS",))
    cfg = load_config(config)
    index = Index(cfg.index_path)
    index.complete_quiet_series(0.0)
    with index.transaction() as db:  # as a crash would have left them
        db.execute("UPDATE jobs SET state = 'running' WHERE series_uid = ?", (running,))
        db.execute("UPDATE outbox SET state = 'sending'")
    index.close()
    leftover = next((tmp_path / "var" / "spool").rglob("*.dcm")).parent / ".tmp-x.dcm.abc"
    leftover.write_bytes(b"half")

    def snapshot() -> list[tuple]:
        db = sqlite3.connect(cfg.index_path)
        try:
            return [*db.execute("SELECT series_uid, state, attempts FROM jobs ORDER BY id"),
                    *db.execute("SELECT series_uid, state FROM series ORDER BY series_uid"),
                    *db.execute("SELECT id, state FROM outbox ORDER BY id")]
        finally:
            db.close()
    before = snapshot()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        out = cli("serve", "--config", str(config), check=False)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"dicomnode serve: error: cannot listen on 127.0.0.1:{port}: ")
    assert "Traceback" not in out.stderr
    assert snapshot() == before
    assert [(r[0], r[1]) for r in before[:2]] == [(queued, "queued"), (running, "running")]
    assert {r[1] for r in before[-2:]} == {SendState.SENDING}
    assert leftover.exists()


def test_serve_fails_a_job_that_was_interrupted_max_job_attempts_times(tmp_path):
    config = write_config(tmp_path / "node.toml", free_port(), tmp_path / "var",
                          extra_node="max_job_attempts = 2")
    uid = seed_series(config, write_series(tmp_path / "a", slices=2, size=16),
                      kind="original")
    index = Index(load_config(config).index_path)
    index.complete_quiet_series(0.0)
    for _ in range(2):  # claimed twice, and each time the process died under it
        index.claim_job()
        index.recover(max_attempts=5)
    index.claim_job()
    index.close()
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        series = status(config)[uid]
    finally:
        assert node.stop() == 0
    assert (series["state"], series["error"]) == ("failed", "interrupted 3 times")
    [recovered] = node.events("node_recovered")
    assert recovered["jobs_given_up"] == [uid] and recovered["jobs_requeued"] == 0


def one_error_line(out) -> str:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    [line] = out.stderr.strip().splitlines()
    return line


def test_a_data_dir_that_cannot_be_created_is_one_line(tmp_path):
    config = write_config(tmp_path / "node.toml", free_port(), Path("/etc/passwd/var"))
    line = one_error_line(cli("serve", "--config", str(config), check=False))
    assert line == "dicomnode serve: error: cannot use data_dir /etc/passwd/var: Not a directory"


def test_a_corrupt_index_is_one_line_for_status_and_serve(tmp_path):
    config = write_config(tmp_path / "node.toml", free_port(), tmp_path / "var")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "index.sqlite").write_bytes(b"this is not SQLite" * 100)
    for command in ("status", "serve"):
        line = one_error_line(cli(command, "--config", str(config), check=False))
        assert line.startswith(f"dicomnode {command}: error: {tmp_path / 'var' / 'index.sqlite'}"
                               " is not a usable index database")


def test_start_removes_temporary_files_a_crash_left_in_spool_archive_and_incoming(tmp_path):
    config = write_config(tmp_path / "node.toml", free_port(), tmp_path / "var")
    seed_series(config, write_series(tmp_path / "a", slices=1, size=16, seed=1),
                kind="original")
    seed_series(config, write_series(tmp_path / "d", slices=1, size=16, seed=2))
    left = [next((tmp_path / "var" / root).rglob("*.dcm")).parent / ".tmp-1.2.3.dcm.x1y2"
            for root in ("spool", "archive")]  # as a crash inside atomic_write leaves them
    # and a data set pynetdicom was writing as it arrived
    (tmp_path / "var" / "incoming").mkdir()
    left.append(tmp_path / "var" / "incoming" / "tmpk2x9_a1.dcm")
    for path in left:
        path.write_bytes(b"half an instance")
    node = NodeProcess(config, tmp_path / "node.log").start()
    assert node.stop() == 0
    assert not any(path.exists() for path in left)
    [recovered] = node.events("node_recovered")
    assert (recovered["temp_removed"], recovered["files_adopted"]) == (3, 0)
    assert len(list((tmp_path / "var").rglob("*.dcm"))) == 2


def test_after_a_clean_stop_start_up_skips_the_spool_walk_and_after_a_crash_it_does_not(
        tmp_path):
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var")
    mark = tmp_path / "var" / "clean-stop"
    files = write_series(tmp_path / "in", slices=2, size=16)
    node = NodeProcess(config, tmp_path / "node.log").start()
    storescu(port, files)
    assert node.stop() == 0
    assert node.events("node_stopped")[-1]["clean"] is True and mark.is_file()
    # what only a crash leaves; a clean stop vouches there is none, so it stays unseen
    leftover = next((tmp_path / "var" / "spool").rglob("*.dcm")).parent / ".tmp-x.dcm.abc"
    leftover.write_bytes(b"half")
    node.start()
    assert not mark.exists()  # taken before anything else: a crash now is seen as one
    assert node.stop(signal.SIGKILL) == -signal.SIGKILL
    node.start()
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    assert status(config)[uid]["instances"] == 2
    assert node.stop() == 0
    walks = [(e["after_clean_stop"], e["temp_removed"]) for e in node.events("node_recovered")]
    assert walks == [(False, 0), (True, 0), (False, 1)]
    assert not leftover.exists() and mark.is_file()


def test_a_stop_that_cuts_an_association_short_leaves_no_clean_stop_mark(tmp_path):
    from dicomnode.node import Node  # in this process, to stop it with a short grace

    port = free_port()
    node = Node(load_config(write_config(tmp_path / "node.toml", port, tmp_path / "var")))
    node.start()
    scu = AE(ae_title="STILLHERE")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", port, ae_title="HARMONISE")
    try:
        assert assoc.is_established
        node.stop(grace=0.5)  # the peer never releases: the node aborts it
    finally:
        assoc.abort()
        scu.shutdown()
    assert not (tmp_path / "var" / "clean-stop").exists()
