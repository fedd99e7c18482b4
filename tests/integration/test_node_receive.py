"""The node as a PACS team sees it: real dcmtk peers against ``dicomnode serve`` on loopback."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import subprocess
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from pipelines import IMPLEMENTATION_CLASS_UID, implementation_version_name
from tests.dicom_factory import siemens_non_image, write_series
from tests.nodeutil import (
    NodeProcess,
    dataset_bytes,
    dcmtk,
    dcmtk_env,
    free_port,
    status,
    storescu,
    wait_for,
    write_config,
)

# With no routes configured a complete series is queued, then processed as unmatched.
COMPLETED = {"queued", "processing", "unmatched"}


@pytest.fixture
def node(start_node):
    return start_node()


def index_rows(node: NodeProcess, sql: str) -> list[tuple]:
    db = sqlite3.connect(Path(str(node.config).replace("node.toml", "var")) / "index.sqlite")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_echo_with_dcmtk_and_the_node_names_its_implementation(node):
    out = subprocess.run([dcmtk("echoscu"), "-d", "-aec", "HARMONISE", "127.0.0.1",
                          str(node.port)], capture_output=True, text=True, timeout=30,
                         env=dcmtk_env())
    assert out.returncode == 0, out.stderr
    assert node.events("association_accepted")
    # what a PACS administrator sees in the peer's association log: us, not our library
    log = out.stdout + out.stderr
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}" in log
    assert f"Their Implementation Version Name: {implementation_version_name()}" in log


def test_300_instance_series_completes_with_right_count(node, tmp_path):
    files = write_series(tmp_path / "in", slices=300, size=16)
    storescu(node.port, files)
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    series = wait_for(lambda: (s := status(node.config).get(uid)) and s["state"] in COMPLETED
                      and s, 30, what="series to complete")
    assert series["instances"] == 300
    complete = [e for e in node.events("series_complete") if e["series_uid"] == uid]
    assert len(complete) == 1 and complete[0]["instances"] == 300
    assert index_rows(node, f"SELECT COUNT(*) FROM jobs WHERE series_uid = '{uid}'") == [(1,)]
    assert len(list((tmp_path / "var" / "spool").rglob("*.dcm"))) == 300
    # Logs carry UIDs, never the patient's name or ID.
    log = node.log.read_text()
    assert "Test^Phantom" not in log and "PHANTOM01" not in log


def test_two_series_interleaved_over_concurrent_associations(node, tmp_path):
    a = write_series(tmp_path / "a", slices=40, size=16, seed=1)
    b = write_series(tmp_path / "b", slices=40, size=16, seed=2)
    ae = AE(ae_title="MODALITY_A")
    ae.add_requested_context(CTImageStorage)
    first = ae.associate("127.0.0.1", node.port, ae_title="HARMONISE")
    assert first.is_established
    statuses = [first.send_c_store(p).Status for p in a[:20]]
    storescu(node.port, b, aet="MODALITY_B")  # a whole association while A's is open
    statuses += [first.send_c_store(p).Status for p in a[20:]]
    first.release()
    assert set(statuses) == {0x0000}
    uids = {name: str(dcmread(f[0]).SeriesInstanceUID) for name, f in (("a", a), ("b", b))}
    done = wait_for(lambda: (s := status(node.config)) and all(
        s.get(u, {}).get("state") in COMPLETED for u in uids.values()) and s, 30,
        what="both series")
    assert {done[u]["instances"] for u in uids.values()} == {40}
    # The node's own log shows the two associations overlapping, and their instances
    # interleaved: A opened, B opened and closed, then A's last instances, A closed.
    order = [(e["event"], e.get("calling_ae") or e.get("series_uid")) for e in node.events()
             if e["event"] in ("association_accepted", "association_released")
             or (e["event"] == "instance_stored" and e["series_uid"] == uids["a"])]
    where = {key: i for i, key in enumerate(order)}  # last occurrence of each
    opened_a = order.index(("association_accepted", "MODALITY_A"))
    opened_b = order.index(("association_accepted", "MODALITY_B"))
    assert opened_a < opened_b < where[("association_released", "MODALITY_B")] \
        < where[("instance_stored", uids["a"])] < where[("association_released", "MODALITY_A")]


def test_malformed_instance_rejected_rest_of_association_stored(node, tmp_path):
    files = write_series(tmp_path / "in", slices=3, size=16)
    datasets = [dcmread(f) for f in files]
    del datasets[1].SeriesInstanceUID  # malformed: no series to file it under
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONISE")
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    assert statuses[0] == 0x0000 and statuses[2] == 0x0000
    assert statuses[1] == 0xC000
    rejected = node.events("instance_rejected")
    assert rejected and "SeriesInstanceUID" in rejected[0]["reason"]
    uid = str(datasets[0].SeriesInstanceUID)
    series = wait_for(lambda: status(node.config).get(uid), 10, what="series indexed")
    assert series["instances"] == 2


def _patched(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    """A copy of ``src`` with one run of data set bytes replaced (the file meta stays valid)."""
    data = src.read_bytes()
    assert data.count(old) == 1
    dst.write_bytes(data.replace(old, new))
    return dst


def test_corrupted_data_sets_get_c000_rest_stored_no_patient_data_logged(node, tmp_path):
    files = write_series(tmp_path / "in", slices=6, size=16)
    rows = b"\x28\x00\x10\x00US\x02\x00\x10\x00"  # Rows = 16, explicit VR little endian
    name = b"Test^Phantom"
    bad = [
        # Rows with an odd length whose bytes are the patient's name (BytesLengthException)
        _patched(files[1], tmp_path / "rows.dcm", rows, b"\x28\x00\x10\x00US\x0d\x00"
                 + name + b"\x00"),
        # an unknown VR on StudyInstanceUID: not explicit VR bytes, refused by the walk
        _patched(files[2], tmp_path / "vr.dcm", b"\x20\x00\x0d\x00UI", b"\x20\x00\x0d\x00\x55\xb4"),
    ]
    # an InstanceNumber that is not a number: accepted (it is not needed to file the
    # instance), but pydicom's read-time validation would quote it in a warning
    odd = _patched(files[3], tmp_path / "is.dcm", b"\x20\x00\x13\x00IS\x02\x004 ",
                   b"\x20\x00\x13\x00IS\x0c\x00" + name)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONISE")
    assert assoc.is_established
    # a path is sent as its encoded bytes, never decoded on our side
    sent = [files[0], *bad, odd, files[4], files[5]]
    statuses = [assoc.send_c_store(p).Status for p in sent]
    assoc.release()
    assert statuses == [0x0000, 0xC000, 0xC000, 0x0000, 0x0000, 0x0000]
    rejected = node.events("instance_rejected")
    assert [(e["error_type"], e["tag"], e["status"]) for e in rejected] == [
        ("BytesLengthException", "(0028,0010)", "0xC000"),
        ("StructureError", "(0020,000D)", "0xC000")]  # no VR: not explicit VR bytes
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    series = wait_for(lambda: status(node.config).get(uid), 10, what="series indexed")
    assert series["instances"] == 4
    log = node.log.read_text(errors="replace")
    assert "Test^Phantom" not in log and "PHANTOM01" not in log
    assert "Traceback" not in log


def test_every_line_the_node_writes_is_a_json_object(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var",
                          extra_node="acse_timeout = 2")  # the garbage connection ends soon
    node = NodeProcess(config, tmp_path / "node.log").start()

    def odd_charset(ds, i):
        ds.SpecificCharacterSet = "ISO_IR 999"  # pydicom warns, through Python warnings
    files = write_series(tmp_path / "in", slices=2, size=16, edit=odd_charset)
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    try:
        echo = subprocess.run([dcmtk("echoscu"), "-aec", "HARMONISE", "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=30, env=dcmtk_env())
        assert echo.returncode == 0, echo.stderr
        storescu(port, files)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"\x07\x00" + bytes(30))  # not a PDU pynetdicom expects: it complains
        wait_for(lambda: (s := status(config).get(uid)) and s["state"] in COMPLETED, 30,
                 what="series to complete")
    finally:
        assert node.stop() == 0
    lines = node.log.read_text().splitlines()
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    events = [json.loads(line) for line in lines]
    foreign = {e["logger"] for e in events if "logger" in e}
    assert "py.warnings" in foreign  # other libraries' lines are JSON too
    assert all(e["level"] in ("warning", "error", "critical") for e in events if "logger" in e)
    assert "Test^Phantom" not in node.log.read_text()


def test_a_data_set_that_cannot_be_written_as_it_arrives_aborts_only_its_association(
        node, tmp_path):
    """Data sets are written to var/incoming as they arrive. When that fails (here the
    folder is gone; a full or failing disk alike) nothing is acknowledged: the association
    is aborted, the node logs it as JSON and serves the next association."""
    files = write_series(tmp_path / "in", slices=2, size=16)
    shutil.rmtree(tmp_path / "var" / "incoming")
    failed = storescu(node.port, files, check=False)
    assert failed.returncode != 0 and "aborted" in failed.stderr.lower(), failed.stderr
    assert not list((tmp_path / "var").rglob("*.dcm"))
    (tmp_path / "var" / "incoming").mkdir()
    storescu(node.port, files)
    assert len(list((tmp_path / "var" / "spool").rglob("*.dcm"))) == 2
    assert not list((tmp_path / "var" / "incoming").iterdir())  # moved, not copied
    assert node.stop() == 0
    for line in node.log.read_text().splitlines():
        assert isinstance(json.loads(line), dict), line
    [crash] = node.events("thread_crashed")
    assert crash["exception"].endswith("FileNotFoundError")


def test_unknown_calling_ae_rejected_known_peer_accepted(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var",
                          extra_node="accept_any_loopback = false",
                          extra='[[peers]]\nae_title = "CT1"\nhost = "127.0.0.1"\n'
                                '[[peers]]\nae_title = "CT2"\nhost = "localhost"\n')
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        echo = [dcmtk("echoscu"), "-aec", "HARMONISE", "127.0.0.1", str(port)]
        bad = subprocess.run([*echo, "-aet", "INTRUDER"], capture_output=True, text=True,
                             timeout=30, env=dcmtk_env())
        good = subprocess.run([*echo, "-aet", "CT1"], capture_output=True, text=True,
                              timeout=30, env=dcmtk_env())
        by_name = subprocess.run([*echo, "-aet", "CT2"], capture_output=True, text=True,
                                 timeout=30, env=dcmtk_env())
    finally:
        assert node.stop() == 0
    assert bad.returncode != 0
    assert "Rejected" in bad.stderr or "rejected" in bad.stderr.lower()
    assert "Calling AE Title Not Recognized" in bad.stderr
    assert good.returncode == 0, good.stderr
    assert by_name.returncode == 0, by_name.stderr  # a peer configured by host name
    rejected = node.events("association_rejected")
    assert len(rejected) == 1 and rejected[0]["calling_ae"] == "INTRUDER"


def test_wrong_called_ae_title_rejected_unless_configured_off(node, tmp_path):
    def echo(port: int, called: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([dcmtk("echoscu"), "-aec", called, "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=30, env=dcmtk_env())
    wrong = echo(node.port, "SOMEBODY_ELSE")
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stderr, wrong.stderr
    [rejected] = node.events("association_rejected")
    assert rejected["called_ae"] == "SOMEBODY_ELSE" and "not ours" in rejected["reason"]
    assert echo(node.port, "HARMONISE").returncode == 0
    port = free_port()
    config = write_config(tmp_path / "lax.toml", port, tmp_path / "lax",
                          extra_node="require_called_aet = false")
    lax = NodeProcess(config, tmp_path / "lax.log").start()
    try:
        anything = echo(port, "SOMEBODY_ELSE")
    finally:
        assert lax.stop() == 0
    assert anything.returncode == 0, anything.stderr


def acknowledged(storescu_output: str) -> list[Path]:
    """Files a verbose storescu run got Success for, from its "Sending file" / "Received
    Store Response (Success)" line pairs."""
    done, current = [], None
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current = Path(line.split("Sending file: ", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def test_kill_9_while_storescu_is_sending_then_resume(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var")
    files = write_series(tmp_path / "in", slices=400, size=64)
    uid = str(dcmread(files[0]).SeriesInstanceUID)
    node = NodeProcess(config, tmp_path / "node.log").start()
    sender = subprocess.Popen([dcmtk("storescu"), "-v", "-aet", "MODALITY", "-aec", "HARMONISE",
                               "127.0.0.1", str(port), *map(str, files)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dcmtk_env())
    try:
        wait_for(lambda: len(node.events("instance_stored")) >= 40, 60, interval=0.01,
                 what="storescu to be under way")
        node.stop(signal.SIGKILL)  # mid-association, mid-series
        output, _ = sender.communicate(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
    assert sender.returncode != 0, "storescu should have lost its association"
    done = acknowledged(output)
    assert 30 <= len(done) < len(files), output[-2000:]
    # Every instance that got Success is on disk, whole, and indexed.
    db = sqlite3.connect(tmp_path / "var" / "index.sqlite")
    indexed = dict(db.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
    db.close()
    for path in done:
        sent = dcmread(path)
        assert str(sent.SOPInstanceUID) in indexed
        assert dcmread(tmp_path / "var" / indexed[str(sent.SOPInstanceUID)]) == sent
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        storescu(port, [f for f in files if f not in set(done)])
        series = wait_for(lambda: (s := status(config).get(uid)) and s["state"] in COMPLETED
                          and s, 60, what="series to complete after restart")
    finally:
        assert node.stop() == 0
    assert series["instances"] == len(files)
    assert len([e for e in node.events("series_complete") if e["series_uid"] == uid]) == 1
    db = sqlite3.connect(tmp_path / "var" / "index.sqlite")
    assert db.execute("SELECT COUNT(*) FROM jobs WHERE series_uid = ?", (uid,)).fetchone() == (1,)
    db.close()


def test_kill_9_under_four_associations_and_a_lost_index_tail_lose_nothing_acknowledged(
        tmp_path):
    """Four storescu at once, the node killed mid-stream, and the index's unsynced tail
    gone as a power cut would take it (received instances are committed without syncing
    the WAL): after a restart every acknowledged instance is indexed and whole."""
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var")
    batches = [write_series(tmp_path / f"in{k}", slices=150, size=64, seed=k) for k in range(4)]
    node = NodeProcess(config, tmp_path / "node.log").start()
    senders = [subprocess.Popen([dcmtk("storescu"), "-v", "-aet", "MODALITY", "-aec",
                                 "HARMONISE", "127.0.0.1", str(port), *map(str, files)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dcmtk_env()) for files in batches]
    try:
        wait_for(lambda: len(node.events("instance_stored")) >= 120, 90, interval=0.01,
                 what="the four associations to be under way")
        node.stop(signal.SIGKILL)
        outputs = [sender.communicate(timeout=60)[0] for sender in senders]
    finally:
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
    done = [path for output in outputs for path in acknowledged(output)]
    assert len(done) >= 100
    for lost in ("index.sqlite-wal", "index.sqlite-shm"):  # what was not synced is gone
        (tmp_path / "var" / lost).unlink(missing_ok=True)
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        [recovered] = node.events("node_recovered")[-1:]
        assert not recovered["after_clean_stop"]
    finally:
        assert node.stop() == 0
    db = sqlite3.connect(tmp_path / "var" / "index.sqlite")
    indexed = dict(db.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
    db.close()
    for path in done:
        sent = dcmread(path)
        assert dcmread(tmp_path / "var" / indexed[str(sent.SOPInstanceUID)]) == sent


def test_jpeg2000_instance_stored_byte_exact(node, tmp_path):
    [path] = write_series(tmp_path / "in", slices=1, size=64)
    ds = dcmread(path)
    ds.compress(JPEG2000Lossless)
    j2k = tmp_path / "j2k.dcm"
    ds.save_as(j2k, enforce_file_format=True)
    storescu(node.port, [j2k], options=["-xv"])
    stored = wait_for(lambda: list((tmp_path / "var" / "spool").rglob("*.dcm")), 10,
                      what="stored file")
    sent, kept = dcmread(j2k), dcmread(stored[0])
    assert kept.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert kept.PixelData == sent.PixelData
    # The data set after the file meta information is the same, byte for byte.
    assert dataset_bytes(stored[0]) == dataset_bytes(j2k)


@pytest.mark.parametrize("option, syntax", [("-xd", DeflatedExplicitVRLittleEndian),
                                             ("-xi", ImplicitVRLittleEndian)])
def test_network_syntaxes_stored_as_they_arrived(node, tmp_path, option, syntax):
    """storescu converts on the fly (deflates, drops explicit VRs): the node keeps the data
    set in the syntax it arrived in, and it decodes to what was sent."""
    files = write_series(tmp_path / "in", slices=2, size=32)
    storescu(node.port, files, options=[option])
    stored = {str(ds.SOPInstanceUID): ds for ds in map(
        dcmread, (tmp_path / "var" / "spool").rglob("*.dcm"))}
    assert len(stored) == 2
    for sent in map(dcmread, files):
        kept = stored[str(sent.SOPInstanceUID)]
        assert kept.file_meta.TransferSyntaxUID == syntax
        assert kept == sent and kept.pixel_array.tolist() == sent.pixel_array.tolist()


def test_duplicates_identical_is_noop_different_replaces(node, tmp_path):
    [path] = write_series(tmp_path / "in", slices=1, size=16)
    storescu(node.port, [path])
    storescu(node.port, [path])
    ds = dcmread(path)
    ds.PixelData = bytes(len(ds.PixelData))
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    storescu(node.port, [changed])
    actions = [e["action"] for e in node.events("instance_stored")]
    assert actions == ["stored", "duplicate", "replaced"]
    stored = list((tmp_path / "var" / "spool").rglob("*.dcm"))
    assert len(stored) == 1 and dcmread(stored[0]).PixelData == ds.PixelData


def test_a_damaged_resend_is_refused_and_the_stored_copy_kept(node, tmp_path):
    """duplicate_policy "replace" must not let a resend with cut pixel data (a truncated
    file re-encoded by the sender) overwrite the good copy: 0xC000, the copy stays."""
    [path] = write_series(tmp_path / "in", slices=1, size=16)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONISE")
    assert assoc.is_established
    good = dcmread(path)
    damaged = dcmread(path)
    damaged.PixelData = damaged.PixelData[:-64]
    statuses = [assoc.send_c_store(ds).Status for ds in (good, damaged)]
    assoc.release()
    assert statuses == [0x0000, 0xC000]
    [rejected] = node.events("instance_rejected")
    assert rejected["reason"].startswith(f"PixelData has {len(good.PixelData) - 64} bytes;")
    [stored] = (tmp_path / "var" / "spool").rglob("*.dcm")
    assert dcmread(stored).PixelData == good.PixelData
    assert index_rows(node, "SELECT COUNT(*) FROM instances") == [(1,)]


def test_disk_reserve_refuses_with_a700_and_keeps_running(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var")
    config.write_text(config.read_text().replace("disk_reserve_mb = 1",
                                                 "disk_reserve_mb = 100000000"))
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        [path] = write_series(tmp_path / "in", slices=1, size=16)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="HARMONISE")
        assert assoc.send_c_store(dcmread(path)).Status == 0xA700
        assoc.release()
        assert subprocess.run([dcmtk("echoscu"), "-aec", "HARMONISE", "127.0.0.1", str(port)],
                              timeout=30, env=dcmtk_env()).returncode == 0
    finally:
        assert node.stop() == 0
    assert node.events("instance_refused_disk_full")
    assert not list((tmp_path / "var" / "spool").rglob("*.dcm"))


def test_sigterm_exits_zero_and_status_json_shape(node, tmp_path):
    files = write_series(tmp_path / "in", slices=5, size=16, series_uid=generate_uid())
    storescu(node.port, files)
    assert node.stop() == 0
    assert node.events("node_stopped")
    [series] = status(node.config).values()
    assert set(series) >= {"series_uid", "state", "instances", "route", "error"}
    assert series["instances"] == 5


PHILIPS_MR_SERIES_DATA = "1.3.46.670589.11.0.0.12.2"  # private, unknown to pynetdicom


def test_every_storage_class_is_negotiated_and_other_services_are_not(node, tmp_path):
    """Standard, private and unknown storage classes are accepted, explicit VR preferred
    and otherwise in the syntax the peer proposes first (stored as it arrives); services
    the node does not offer are not, and a worklist query (which pynetdicom's negotiation
    lets through) is refused. Storage commitment is offered (tests/test_commitment.py)."""
    commitment, mpps = "1.2.840.10008.1.20.1", "1.2.840.10008.3.1.2.3.3"
    worklist = "1.2.840.10008.5.1.4.31"
    ae = AE(ae_title="MODALITY")
    proposed = {PHILIPS_MR_SERIES_DATA: [ImplicitVRLittleEndian, ExplicitVRLittleEndian],
                PositronEmissionTomographyImageStorage: [ExplicitVRLittleEndian],
                CTImageStorage: [HTJ2KLossless, ExplicitVRLittleEndian],
                MRImageStorage: [HTJ2KLossless, "1.2.840.10008.1.2.4.203"],  # HTJ2K, then lossy
                "1.2.840.10008.5.1.4.1.1.9999": [ImplicitVRLittleEndian]}
    expected = {PHILIPS_MR_SERIES_DATA: ExplicitVRLittleEndian,
                PositronEmissionTomographyImageStorage: ExplicitVRLittleEndian,
                CTImageStorage: ExplicitVRLittleEndian, MRImageStorage: HTJ2KLossless,
                "1.2.840.10008.5.1.4.1.1.9999": ImplicitVRLittleEndian}
    for uid, syntaxes in proposed.items():
        ae.add_requested_context(uid, syntaxes)
    ae.add_requested_context(commitment)
    ae.add_requested_context(mpps)
    ae.add_requested_context(worklist)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONISE")
    assert assoc.is_established
    try:
        accepted = {str(c.abstract_syntax): str(c.transfer_syntax[0])
                    for c in assoc.accepted_contexts}
        assert {uid: str(syntax) for uid, syntax in expected.items()}.items() <= \
            accepted.items()
        assert commitment in accepted and mpps not in accepted
        private = siemens_non_image(dcmread(write_series(tmp_path / "in", slices=1)[0]))
        private.SOPClassUID = PHILIPS_MR_SERIES_DATA
        assert assoc.send_c_store(private).Status == 0x0000
        if worklist in accepted:
            query = Dataset()
            query.PatientName = "*"
            [(final, _)] = list(assoc.send_c_find(query, worklist))
            assert final.Status == 0x0122
    finally:
        assoc.release()
    [(sop_class,)] = index_rows(node, "SELECT sop_class_uid FROM instances")
    assert sop_class == PHILIPS_MR_SERIES_DATA


def test_a_c_store_of_another_class_than_negotiated_is_refused_not_aborted(node, tmp_path):
    """A sender whose C-STORE names a SOP class pynetdicom does not know (dcmsend sent
    "31" after failing to decode an RLE file) got its association aborted, losing the rest
    of its transfer; it gets 0x0122 and the association carries on."""
    first, second = write_series(tmp_path / "in", slices=2)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONISE")
    assert assoc.is_established
    try:
        [context] = assoc.accepted_contexts
        req = C_STORE()
        req.MessageID, req.Priority = 1, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = "31", "31"
        req.DataSet = BytesIO(dataset_bytes(first))
        # pause our reactor so the response is ours to read, as send_c_store does
        assoc._reactor_checkpoint.clear()
        wait_for(lambda: assoc._is_paused, 10, interval=0.001, what="SCU reactor paused")
        try:
            assoc.dimse.send_msg(req, context.context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp.Status == 0x0122
        assert assoc.is_established
        assert assoc.send_c_store(dcmread(second)).Status == 0x0000
    finally:
        assoc.release()
    [event] = node.events("instance_rejected")
    assert event["reason"] == ("C-STORE of SOP class 31 on a presentation context for"
                               f" {CTImageStorage}")
    assert index_rows(node, "SELECT COUNT(*) FROM instances") == [(1,)]
