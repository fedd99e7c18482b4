"""The outbox against a real PACS (Orthanc from its Debian package) and dcmtk's storescp:
delivery with provenance, outages, kill -9, give-up after max age, explicit resend,
transfer syntax fallback."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless, generate_uid

from dicomnode.cli import main as cli_main
from dicomnode.config import load_config
from dicomnode.dispatch import outbox
from dicomnode.log import configure
from dicomnode.store import sends
from dicomnode.store.index import Index
from tests.dicom_factory import siemens_non_image, write_companions, write_series
from tests.model_factory import make_plain_model
from tests.nodeutil import (
    NodeProcess,
    dcmtk,
    free_port,
    scanner_store,
    storescu,
    wait_for,
    write_config,
)
from tests.orthanc import Orthanc, have_orthanc, seed_series

pytestmark = pytest.mark.skipif(not have_orthanc(), reason="Orthanc not installed")

FAST_RETRY = """
[outbox]
retry_initial = 0.2
retry_max_interval = 1.0
max_age_hours = {max_age}
poll_interval = 0.2
"""


def peers(**ports: int) -> str:
    return "".join(f'[[peers]]\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n'
                   for ae, port in ports.items())


def node_config(tmp: Path, *, orthanc_port: int, max_age: float = 1.0, extra: str = "",
                **more_peers: int) -> tuple[Path, int]:
    port = free_port()
    config = write_config(tmp / "node.toml", port, tmp / "var", series_timeout=0.5,
                          extra=FAST_RETRY.format(max_age=max_age)
                          + peers(ORTHANC=orthanc_port, **more_peers) + extra)
    return config, port


def rows(config: Path, sql: str, *args) -> list[sqlite3.Row]:
    db = sqlite3.connect(Path(config).parent / "var" / "index.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def series_state(config: Path, uid: str) -> str | None:
    found = rows(config, "SELECT state FROM series WHERE series_uid = ?", uid)
    return found[0]["state"] if found else None


def derived_files(tmp: Path, count: int, seed: int = 5, size: int = 16, **kw) -> list[Path]:
    def derive(ds, i):
        ds.SeriesDescription = "Thorax B70f [harmonised: ct-test]"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    return write_series(tmp / f"derived{seed}", slices=count, size=size, seed=seed,
                        series_uid=generate_uid(), edit=derive, **kw)


def sop_uids(files: list[Path]) -> set[str]:
    return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}

def start_storescp(out: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    """dcmtk's storescp as peer STORESCP writing into ``out``, once it accepts connections."""
    out.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-aet", "STORESCP", "+uf", "-od", str(out),
                            str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: subprocess.run([dcmtk("echoscu"), "-aec", "STORESCP", "127.0.0.1",
                                     str(port)], capture_output=True).returncode == 0,
             10, what="storescp listening")
    return scp, out



# --- end to end: storescu -> node -> harmonised -> Orthanc ----------------------------

ROUTE = """
[[routes]]
name = "ct-sharp"
model = "ct-test"
send_to = ["ORTHANC"]
[routes.match]
Modality = "CT"
ConvolutionKernel = "B7*"
"""


def harmonising_node(tmp: Path) -> tuple[Path, Path, int, int]:
    """A node config routing B70f CT to a small test model and sending it to ORTHANC:
    (models folder, config, node port, Orthanc's DICOM port)."""
    models = tmp / "models"
    make_plain_model(models, "ct-test")
    orthanc_port = free_port()
    config, port = node_config(tmp, orthanc_port=orthanc_port, extra=ROUTE)
    config.write_text(config.read_text().replace(
        "[node]\n", f'[node]\nmodels_dir = "{models}"\n'))
    return models, config, port, orthanc_port


def test_storescu_series_arrives_harmonised_in_orthanc_with_every_provenance_tag(tmp_path):
    models, config, port, orthanc_port = harmonising_node(tmp_path)
    source = write_series(tmp_path / "sharp", slices=4, size=32, kernel="B70f", seed=1)
    source_uid = str(dcmread(source[0]).SeriesInstanceUID)
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port).start()
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        storescu(port, source)
        arrived = orthanc.wait_instances(4, timeout=90)
        wait_for(lambda: series_state(config, source_uid) == "sent", 30,
                 what="original series to become 'sent'")
        received = {i["ID"]: (dcmread(BytesIO(orthanc.get(f"/instances/{i['ID']}/file"))),
                              orthanc.tags(i["ID"])) for i in arrived}
    finally:
        node.stop()
        orthanc.stop()
    [derived] = rows(config, "SELECT * FROM series WHERE kind = 'derived'")
    assert derived["state"] == "sent" and derived["source_series_uid"] == source_uid
    assert orthanc.store_requests("HARMONISE") == 4 and orthanc.overwrites() == 0
    archived = {r["sop_instance_uid"]: tmp_path / "var" / r["path"] for r in rows(
        config, "SELECT * FROM instances WHERE series_uid = ?", derived["series_uid"])}
    assert len(received) == len(archived) == 4
    source_sops = sop_uids(source)
    model_sha = json.loads((models / "ct-test" / "model.json").read_text())["weights_sha256"]
    for got, tags in received.values():
        ours = dcmread(archived[str(got.SOPInstanceUID)])
        # every element the node wrote (provenance, private block, pixels) arrived as is
        assert got == ours
        assert tags["SeriesInstanceUID"] == derived["series_uid"] != source_uid
        assert tags["ImageType"] == "DERIVED\\SECONDARY\\AXIAL"
        assert tags["SeriesDescription"].endswith(" [harmonised: ct-test]")
        assert "ct-test" in tags["DerivationDescription"]
        assert model_sha in tags["DerivationDescription"]
        refs = {i["ReferencedSOPInstanceUID"] for i in tags["SourceImageSequence"]}
        assert refs and refs <= source_sops
        assert all(i["PurposeOfReferenceCodeSequence"][0]["CodeValue"] == "121322"
                   for i in tags["SourceImageSequence"])
        assert tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == source_uid
        equipment = {e["PurposeOfReferenceCodeSequence"][0]["CodeValue"]: e
                     for e in tags["ContributingEquipmentSequence"]}
        assert set(equipment) == {"109101", "109102"}
        assert equipment["109102"]["ManufacturerModelName"] == "ct-test"
        assert got.get((0x0011, 0x0010)).value == "DICOMNODE HARMONISATION 1"
    assert {str(dcmread(p).StudyInstanceUID) for p in archived.values()} == {
        str(dcmread(source[0]).StudyInstanceUID)}


def test_orthanc_pushes_a_study_and_gets_it_back_harmonised(tmp_path):
    """The PACS as the sender: Orthanc C-STOREs a study (one series uncompressed, one in
    JPEG 2000, with a segmentation, key objects, contours, a dose, a report and a Siemens
    private object) to the node; the images are stored as received, harmonised and come
    back; the rest is kept, unmatched."""
    _, config, port, orthanc_port = harmonising_node(tmp_path)
    plain = write_series(tmp_path / "plain", slices=4, size=32, kernel="B70f", seed=3)
    j2k = write_series(tmp_path / "j2k", slices=4, size=32, kernel="B70f", seed=3,
                       syntax=JPEG2000Lossless)
    sources = {str(dcmread(f[0]).SeriesInstanceUID): f for f in (plain, j2k)}
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port,
                      modalities={"HARMONISE": ("127.0.0.1", port)}).start()
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        storescu(orthanc_port, plain)
        storescu(orthanc_port, j2k, options=["-xv"])
        companions = write_companions(plain, tmp_path / "companions")
        storescu(orthanc_port, companions)
        companions.append(tmp_path / "companions" / "csa.dcm")  # a private class too
        siemens_non_image(dcmread(plain[0])).save_as(companions[-1], enforce_file_format=True)
        assert scanner_store(orthanc_port, companions[-1:], called="ORTHANC") == [0x0000]
        [study] = orthanc.get("/studies")
        orthanc.post("/modalities/HARMONISE/store", {"Resources": [study]}, timeout=120)
        for uid in sources:
            wait_for(lambda uid=uid: series_state(config, uid) == "sent", 60,
                     what=f"series {uid} harmonised and sent back")
        for uid in {str(dcmread(f).SeriesInstanceUID) for f in companions}:
            wait_for(lambda uid=uid: series_state(config, uid) == "unmatched", 30,
                     what=f"companion series {uid} kept, unmatched")
        arrived = orthanc.wait_instances(16 + len(companions), timeout=60)
    finally:
        node.stop()
        orthanc.stop()
    for uid, files in sources.items():
        stored = {r["sop_instance_uid"]: tmp_path / "var" / r["path"] for r in rows(
            config, "SELECT * FROM instances WHERE series_uid = ?", uid)}
        assert set(stored) == sop_uids(files)
        for f in files:  # the data set as the scanner wrote it, pixel bytes included
            sent, kept = dcmread(f), dcmread(stored[str(dcmread(f).SOPInstanceUID)])
            assert kept.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
            assert kept == sent and kept.PixelData == sent.PixelData
    derived = rows(config, "SELECT * FROM series WHERE kind = 'derived'")
    assert sorted(d["source_series_uid"] for d in derived) == sorted(sources)
    assert all(d["state"] == "sent" and d["instances"] == 4 for d in derived)
    back = {i["MainDicomTags"]["SOPInstanceUID"] for i in arrived} - sop_uids(
        plain + j2k + companions)
    assert len(back) == 8
    assert orthanc.store_requests("HARMONISE") == 8


# --- outage: destination down, node retries with backoff, destination up ---------------

def test_destination_down_then_up_everything_arrives_exactly_once(tmp_path):
    orthanc_port = free_port()
    config, _ = node_config(tmp_path, orthanc_port=orthanc_port)
    files = derived_files(tmp_path, 5)
    uid = seed_series(config, files, send_to=("ORTHANC",))
    node = NodeProcess(config, tmp_path / "node.log").start()
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port)
    try:
        retries = wait_for(lambda: len(r := node.events("send_retry_scheduled")) >= 5 and r,
                           30, what="several retries while the destination is down")
        assert all(e["instances"] == 5 for e in retries)  # one line per series and attempt
        waits = sorted({e["retry_in_s"] for e in retries})
        assert waits[:4] == [0.2, 0.4, 0.8, 1.0]  # exponential, capped at retry_max_interval
        assert "association with ORTHANC" in retries[-1]["reason"]
        assert series_state(config, uid) == "archived"  # still trying, not failed
        orthanc.start()
        orthanc.wait_instances(5, timeout=30)
        wait_for(lambda: series_state(config, uid) == "sent", 30, what="series sent")
    finally:
        node.stop()
        orthanc.stop()
    sent = rows(config, "SELECT * FROM outbox WHERE series_uid = ?", uid)
    assert {r["state"] for r in sent} == {"sent"} and len(sent) == 5
    assert min(r["attempts"] for r in sent) >= 3
    assert orthanc.store_requests("HARMONISE") == 5 and orthanc.overwrites() == 0
    assert "Test^Phantom" not in node.log.read_text()


# --- kill -9 in the middle of sending, restart -----------------------------------------

def test_kill_9_while_sending_then_restart_delivers_each_instance_exactly_once(tmp_path):
    orthanc_port = free_port()
    config, port = node_config(tmp_path, orthanc_port=orthanc_port)
    files = derived_files(tmp_path, 60, size=16)
    uid = seed_series(config, files, send_to=("ORTHANC",))
    # Orthanc knows the node as a modality, so it answers the node's C-FIND
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port,
                      modalities={"HARMONISE": ("127.0.0.1", port)}).start()
    node = NodeProcess(config, tmp_path / "node.log")
    try:
        node.start()
        wait_for(lambda: orthanc.get("/statistics")["CountInstances"] >= 8, 30, interval=0.01,
                 what="sending to be under way")
        node.stop(signal.SIGKILL)
        in_orthanc = set(orthanc.sop_uids())
        assert 0 < len(in_orthanc) < 60, "the kill should land mid-series"
        state = rows(config, "SELECT sop_instance_uid, state FROM outbox")
        sent = {r["sop_instance_uid"] for r in state if r["state"] == "sent"}
        sending = {r["sop_instance_uid"] for r in state if r["state"] == "sending"}
        # confirmed means received; a received-but-unconfirmed instance can only be one
        # whose response was in flight at the kill
        assert sent <= in_orthanc and in_orthanc - sent <= sending
        node.start()
        orthanc.wait_instances(60, timeout=60)
        wait_for(lambda: series_state(config, uid) == "sent", 30, what="series sent")
        final = set(orthanc.sop_uids())
    finally:
        if node.proc and node.proc.poll() is None:
            node.stop()
        orthanc.stop()
    assert final == sop_uids(files)
    assert orthanc.overwrites() == 0  # exactly once: uncertain rows were asked about first
    assert orthanc.store_requests("HARMONISE") == 60
    [recovered] = node.events("outbox_recovered")
    assert recovered["uncertain"] == len(sending)
    [checked] = node.events("sends_uncertain_checked")
    assert checked["instances"] == len(sending)
    assert checked["already_held"] == len(in_orthanc - sent)


def crash_mid_send(config: Path, held: list[Path], not_held: list[Path]) -> None:
    """Leave outbox rows as a kill -9 would: 'sending', some already at the peer."""
    uids = sop_uids(held) | sop_uids(not_held)
    index = Index(load_config(config).index_path)
    with index.transaction() as db:
        db.execute(f"UPDATE outbox SET state = 'sending', attempts = 1 WHERE sop_instance_uid"
                   f" IN ({', '.join('?' * len(uids))})", tuple(uids))
    assert outbox.recover(index) == len(uids)
    index.close()


def test_uncertain_sends_are_checked_by_c_find_and_not_sent_twice(tmp_path):
    orthanc_port = free_port()
    config, port = node_config(tmp_path, orthanc_port=orthanc_port)
    files = derived_files(tmp_path, 5)
    uid = seed_series(config, files, send_to=("ORTHANC",))
    crash_mid_send(config, held=files[:2], not_held=files[2:3])
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port,
                      modalities={"HARMONISE": ("127.0.0.1", port)}).start()
    cfg = load_config(config)
    index = Index(cfg.index_path)
    try:
        storescu(orthanc_port, files[:2], aet="EARLIER", options=["-aec", "ORTHANC"])
        outbox.Outbox(cfg, index).dispatch()
        assert series_state(config, uid) == "sent"
        final = set(orthanc.sop_uids())
    finally:
        index.close()
        orthanc.stop()
    assert final == sop_uids(files)
    assert orthanc.store_requests("HARMONISE") == 3 and orthanc.overwrites() == 0
    by_uid = {r["sop_instance_uid"]: r for r in rows(config, "SELECT * FROM outbox")}
    assert {by_uid[u]["status"] for u in sop_uids(files[:2])} == {None}  # confirmed by query
    assert {by_uid[u]["status"] for u in sop_uids(files[2:])} == {0}  # confirmed by C-STORE


def test_uncertain_sends_to_a_peer_without_c_find_are_resent_and_logged(tmp_path, capsys):
    configure("info")
    scp_port = free_port()
    config, _ = node_config(tmp_path, orthanc_port=free_port(), STORESCP=scp_port)
    files = derived_files(tmp_path, 3)
    seed_series(config, files, send_to=("STORESCP",))
    crash_mid_send(config, held=[], not_held=files[:2])
    scp, out = start_storescp(tmp_path / "storescp", scp_port)
    cfg = load_config(config)
    index = Index(cfg.index_path)
    try:
        outbox.Outbox(cfg, index).dispatch()
    finally:
        index.close()
        scp.terminate()
        scp.wait(10)
    assert {r["state"] for r in rows(config, "SELECT state FROM outbox")} == {"sent"}
    assert len(list(out.iterdir())) == 3
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    [resent] = [e for e in events if e["event"] == "sends_uncertain_resent"]
    assert resent["instances"] == 2 and "at least once" in resent["reason"]


# --- give up after max age, status, explicit resend ------------------------------------

def test_failed_after_max_age_shown_in_status_then_resend(tmp_path, capsys):
    configure("warning")  # JSON logs to stderr: stdout is the commands' output
    orthanc_port = free_port()
    config, _ = node_config(tmp_path, orthanc_port=orthanc_port, max_age=0.0003)  # ~1 s
    files = derived_files(tmp_path, 3)
    original = seed_series(config, write_series(tmp_path / "orig", slices=3, size=16, seed=5),
                           kind="original")
    cfg = load_config(config)
    index = Index(cfg.index_path)
    index.set_series_state(original, "harmonised", route="ct-sharp")  # as the worker leaves it
    uid = seed_series(config, files, send_to=("ORTHANC",), source_series_uid=original)
    box = outbox.Outbox(cfg, index)
    wait_for(lambda: (box.dispatch(), series_state(config, uid) == "failed")[1], 20,
             interval=0.2, what="sends to give up")
    failed = rows(config, "SELECT * FROM outbox")
    assert {r["state"] for r in failed} == {"failed"}
    assert all("association with ORTHANC" in r["error"] for r in failed)
    assert cli_main(["status", "--config", str(config), "--json"]) == 0
    shown = {s["series_uid"]: s for s in json.loads(capsys.readouterr().out)["series"]}
    for u in (uid, original):
        assert shown[u]["state"] == "failed"
        assert shown[u]["error"].startswith("send to ORTHANC: association with ORTHANC")
    assert shown[uid]["sends"] == {"ORTHANC": {"failed": 3}}
    assert cli_main(["status", "--config", str(config)]) == 0
    assert "error=send to ORTHANC" in capsys.readouterr().out

    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port).start()
    try:
        time.sleep(0.3)
        box.dispatch()  # failed rows stay failed: nothing is sent without a resend
        assert orthanc.instances() == []
        assert cli_main(["resend", "--config", str(config), "--failed"]) == 0
        assert "3 instance send(s) queued" in capsys.readouterr().out
        assert series_state(config, original) == "harmonised"
        box.dispatch()
        assert len(orthanc.instances()) == 3
        assert series_state(config, uid) == "sent" and series_state(config, original) == "sent"
        box.dispatch()  # confirmed: never sent again by itself
        assert cli_main(["resend", "--config", str(config), "--series", original]) == 0
        box.dispatch()
        with pytest.raises(SystemExit):
            cli_main(["resend", "--config", str(config)])  # one of --series/--failed
        assert cli_main(["resend", "--config", str(config), "--series", "1.2.3.4"]) == 2
        assert "not in the index" in capsys.readouterr().err
    finally:
        orthanc.stop()
        index.close()
    assert orthanc.store_requests() == 6 and orthanc.overwrites() == 3


# --- transfer syntax negotiation with fallback -----------------------------------------

def test_compressed_instance_sent_as_stored_or_decompressed_for_an_uncompressed_peer(tmp_path):
    orthanc_port, scp_port = free_port(), free_port()
    config, _ = node_config(tmp_path, orthanc_port=orthanc_port, STORESCP=scp_port)
    files = derived_files(tmp_path, 2, size=32, syntax=JPEG2000Lossless)
    uid = seed_series(config, files, send_to=("ORTHANC", "STORESCP"))
    scp, out = start_storescp(tmp_path / "storescp", scp_port)
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port).start()
    cfg = load_config(config)
    index = Index(cfg.index_path)
    try:
        wait_for(lambda: (outbox.Outbox(cfg, index).dispatch(),
                          series_state(config, uid) == "sent")[1], 30, interval=0.3,
                 what="both destinations")
        in_orthanc = orthanc.instances()
        syntaxes = {orthanc.get(f"/instances/{i['ID']}/metadata/TransferSyntax")
                    for i in in_orthanc}
    finally:
        index.close()
        orthanc.stop()
        scp.terminate()
        scp.wait(10)
    assert syntaxes == {JPEG2000Lossless.encode()}  # Orthanc accepts JPEG 2000: sent as stored
    received = [dcmread(p) for p in out.iterdir()]
    assert len(received) == 2
    assert {str(r.file_meta.TransferSyntaxUID) for r in received} <= {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # storescp takes uncompressed only
    originals = {str(d.SOPInstanceUID): d for d in map(dcmread, files)}
    for r in received:
        assert np.array_equal(r.pixel_array, originals[str(r.SOPInstanceUID)].pixel_array)
    sent = rows(config, "SELECT destination, transfer_syntax FROM outbox")
    assert {(r["destination"], r["transfer_syntax"]) for r in sent} == {
        ("ORTHANC", JPEG2000Lossless), ("STORESCP", "1.2.840.10008.1.2.1")}


# --- an unreadable archived file fails its own send only -------------------------------

def test_unreadable_archived_files_fail_their_own_send_only(tmp_path, monkeypatch):
    scp_port = free_port()
    config, _ = node_config(tmp_path, orthanc_port=free_port(), STORESCP=scp_port)
    files = derived_files(tmp_path, 4, size=32, syntax=JPEG2000Lossless)
    uid = seed_series(config, files, send_to=("STORESCP",))
    archived = {r["sop_instance_uid"]: tmp_path / "var" / r["path"]
                for r in rows(config, "SELECT * FROM instances ORDER BY instance_number")}
    garbage, no_codec, *good = archived
    archived[garbage].write_bytes(b"\x00" * 64 + b"Test^Phantom")  # InvalidDicomError
    data = archived[no_codec].read_bytes()  # a syntax pydicom has no decoder for
    archived[no_codec].write_bytes(data.replace(b"1.2.840.10008.1.2.4.90",
                                                b"1.2.840.10008.1.2.4.92"))
    scp, out = start_storescp(tmp_path / "storescp", scp_port)
    cfg = load_config(config)
    index = Index(cfg.index_path)
    box = outbox.Outbox(cfg, index)
    try:
        assert box.dispatch() == 4
        state = {r["sop_instance_uid"]: r for r in rows(config, "SELECT * FROM outbox")}
        received = sorted(str(dcmread(p).SOPInstanceUID) for p in out.iterdir())
        # an error escaping the loop (here: the commit after a Success) leaves no row
        # 'sending' until a restart: what was not recorded goes back to pending
        outbox.resend(index, series_uid=uid)
        monkeypatch.setattr(sends, "mark_sent", lambda *a: (_ for _ in ()).throw(
            sqlite3.OperationalError("disk I/O error")))
        with pytest.raises(sqlite3.OperationalError):
            box.dispatch()
        after = rows(config, "SELECT state FROM outbox")
    finally:
        index.close()
        scp.terminate()
        scp.wait(10)
    assert {k: (r["state"], r["attempts"], r["error"]) for k, r in state.items()} == {
        garbage: ("pending", 1, "InvalidDicomError"),
        no_codec: ("pending", 1, "NotImplementedError"),
        **{k: ("sent", 1, None) for k in good}}
    assert received == sorted(good)
    assert {r["state"] for r in after} == {"pending"}
