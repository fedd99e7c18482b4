"""The standing fuzz and abuse suite: a running node, fed what real scanners send, what is
broken, and what an attacker or a confused peer sends, one case after another.

After every case the node still answers C-ECHO from a legitimate peer (another loopback
host) within 2 s; at the end its memory has stayed bounded, its incoming folder is empty,
every file it stored reads with dcmtk's dcmdump, and every line it wrote is JSON.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.bad_data import (
    Case,
    broken,
    implicit_copy,
    quirks,
    split,
    truncations,
    with_uids,
    wrong_syntax,
)
from tests.dicom_factory import write_series
from tests.nodeutil import NodeProcess, dcmtk, free_port, status, wait_for, write_config
from tests.pdus import ABORT, CT_IMAGE_STORAGE, RELEASE_RQ, Raw, associate_rq, p_data, pdu

LEGITIMATE = "127.0.0.2"  # the peer that must keep getting through: another loopback host
TIMEOUT = 3               # the node's acse_timeout and network_timeout here
MAX_PDU = 65536
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("abuse")
    port = free_port()
    config = write_config(tmp / "node.toml", port, tmp / "var", series_timeout=300,
                          extra_node=f"acse_timeout = {TIMEOUT}\nnetwork_timeout = {TIMEOUT}\n"
                          f"max_pdu_size = {MAX_PDU}\nmax_handshakes_per_host = 8\n")
    proc = NodeProcess(config, tmp / "node.log").start()
    proc.port, proc.tmp = port, tmp
    proc.rss_at_start = rss_kib(proc)
    yield proc
    proc.stop()


def rss_kib(node: NodeProcess) -> int:
    status_lines = Path(f"/proc/{node.proc.pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status_lines if line.startswith("VmRSS:")))


def legitimate_echo(port: int, within: float = 2.0) -> None:
    """A C-ECHO from another host gets through, association and all, within ``within`` s."""
    started = time.monotonic()
    ae = AE(ae_title="LEGIT")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONISE", bind_address=(LEGITIMATE, 0))
    assert assoc.is_established, "the node refused a legitimate peer"
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert time.monotonic() - started < within


def store(port: int, cases: list[Case], folder: Path) -> list[int | None]:
    """C-STORE each case's file (its bytes as they are) on contexts of its syntax; the
    statuses (None: no response, the association was aborted)."""
    statuses: list[int | None] = []
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        for syntax in {c.syntax for c in cases}:
            statuses += _store(port, [c for c in cases if c.syntax == syntax], folder, syntax)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    order = [c for s in {c.syntax for c in cases} for c in cases if c.syntax == s]
    return [statuses[order.index(c)] for c in cases]


def _store(port: int, cases: list[Case], folder: Path, syntax: str) -> list[int | None]:
    statuses: list[int | None] = []
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = None
    for case in cases:
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title="HARMONISE")
            assert assoc.is_established
        rsp = assoc.send_c_store(case.write(folder))
        statuses.append(int(rsp.Status) if "Status" in rsp else None)
    assoc.release()
    return statuses


def incoming(node: NodeProcess) -> list[Path]:
    folder = node.tmp / "var" / "incoming"
    return sorted(folder.iterdir()) if folder.exists() else []


def indexed(node: NodeProcess, sop_uid: str) -> bool:
    db = sqlite3.connect(node.tmp / "var" / "index.sqlite")
    try:
        return db.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?",
                          (sop_uid,)).fetchone() is not None
    finally:
        db.close()


# --- data sets ------------------------------------------------------------------------

def fuzz_cases(files: list[Path], tmp: Path) -> list[tuple[str, Case]]:
    """Every cut, broken structure and wrong syntax of the base instance, each made from
    its own instance (its own SOP Instance UID): ``(that UID, case)``."""
    out = []
    for i, path in enumerate(files):
        meta, dataset = split(path)
        implicit = split(implicit_copy(path, tmp / "implicit.dcm"))[1]
        variants = [*(Case(n, d, ok) for n, d, ok in truncations(meta, dataset)),
                    *(Case(n, d, False) for n, d in broken(meta, dataset)),
                    *wrong_syntax(meta, dataset, implicit)]
        if i == len(variants):
            break
        out.append((str(dcmread(path, stop_before_pixels=True).SOPInstanceUID), variants[i]))
    return out


def test_every_cut_bad_length_and_wrong_syntax_is_refused_and_the_rest_stored(node, tmp_path):
    generated = fuzz_cases(write_series(tmp_path / "base", slices=200, size=8, seed=11),
                           tmp_path)
    cases = [case for _, case in generated]
    assert len(cases) >= 100 and len({c.name for c in cases}) == len(cases)
    statuses = store(node.port, cases, tmp_path)
    wrong = [(c.name, s) for c, s in zip(cases, statuses, strict=True)
             if s != (0x0000 if c.accepted else 0xC000)]
    assert not wrong
    for uid, case in generated:
        assert indexed(node, uid) == case.accepted, case.name
    legitimate_echo(node.port)
    assert incoming(node) == []


def test_a_refused_resend_never_touches_the_stored_copy(node, tmp_path):
    [path] = write_series(tmp_path / "good", slices=1, size=8, seed=21)
    meta, dataset = split(path)
    assert store(node.port, [Case("good", path.read_bytes(), True)], tmp_path) == [0x0000]
    stored = wait_for(lambda: list((node.tmp / "var" / "spool").rglob(
        f"{dcmread(path).SOPInstanceUID}*.dcm")), 5, what="stored copy")
    before = [p.read_bytes() for p in stored]
    damaged = [Case(name, data, False) for name, data in broken(meta, dataset)
               if name in ("pixel-data-declares-2gib-sends-512", "ends-three-bytes-into-pixel-tag",
                           "ob-length-fffffff0-before-pixels")]
    damaged.append(Case("cut-mid-pixels", meta + dataset[:-7], False))
    assert store(node.port, damaged, tmp_path) == [0xC000] * len(damaged)
    after = list((node.tmp / "var" / "spool").rglob(f"{dcmread(path).SOPInstanceUID}*.dcm"))
    assert after == stored and [p.read_bytes() for p in after] == before


def test_real_scanner_quirks_are_stored_indexed_and_noted(node, tmp_path):
    files = write_series(tmp_path / "base", slices=8, size=8, seed=31)
    names = [name for name, _ in quirks(*split(files[0]))]
    cases = [Case(name, dict(quirks(*split(path)))[name], True)
             for path, name in zip(files, names, strict=False)]
    leading = with_uids(dcmread(files[-1]), tmp_path / "leading-zero.dcm",
                        SeriesInstanceUID="1.2.840.113619.2.055.3.2831", SOPInstanceUID=(
                            "1.2.840.113619.2.055.3.2831.07"))
    cases.append(Case("leading-zero-uid-components", leading.read_bytes(), True))
    assert store(node.port, cases, tmp_path) == [0x0000] * len(cases)
    legitimate_echo(node.port)
    series = wait_for(lambda: status(node.config).get("1.2.840.113619.2.055.3.2831"), 10,
                      what="the leading-zero series")
    assert "leading zero" in series["note"]
    [event] = [e for e in node.events("instance_nonconformant")
               if e["series_uid"] == "1.2.840.113619.2.055.3.2831"]
    assert any("SOPInstanceUID 1.2.840.113619.2.055.3.2831.07" in n for n in event["notes"])
    un = status(node.config)[str(dcmread(files[0]).SeriesInstanceUID)]
    assert un["modality"] == "CT"  # read by its dictionary VR, not as UN bytes


# --- PDUs -----------------------------------------------------------------------------

def established(port: int) -> Raw:
    raw = Raw(port)
    raw.send(associate_rq(contexts=((CT_IMAGE_STORAGE, ExplicitVRLittleEndian),)))
    kind, _ = raw.read_pdu()
    assert kind == A_ASSOCIATE_AC
    return raw


PDU_CASES = {
    "associate-rq-claiming-256-mib": (lambda: pdu(0x01, b"")[:2] + struct.pack(">L", 2**28),
                                      False),
    "unknown-type-00": (lambda: struct.pack(">BBL", 0x00, 0, 4) + bytes(4), False),
    "unknown-type-08": (lambda: struct.pack(">BBL", 0x08, 0, 4) + bytes(4), False),
    "unknown-type-ff-huge": (lambda: struct.pack(">BBL", 0xFF, 0, 2**31), False),
    "p-data-before-associate": (lambda: p_data(1, b"\x00" * 16, True, True), False),
    "release-before-associate": (lambda: RELEASE_RQ, False),
    "abort-before-associate": (lambda: ABORT, False),
    "p-data-over-max-pdu": (lambda: struct.pack(">BBL", 0x04, 0, MAX_PDU + 1), True),
    "p-data-claiming-1-gib": (lambda: struct.pack(">BBL", 0x04, 0, 2**30), True),
    "second-associate-rq": (lambda: associate_rq(), True),
    "release-rp-unsolicited": (lambda: pdu(0x06, bytes(4)), True),
}


@pytest.mark.parametrize("name", sorted(PDU_CASES))
def test_pdus_out_of_order_unknown_or_oversize_are_aborted_unread(node, name):
    make, after_handshake = PDU_CASES[name]
    rss = rss_kib(node)
    with (established(node.port) if after_handshake else Raw(node.port)) as raw:
        raw.send(make())
        answer = raw.read_pdu()
        assert answer is None or answer[0] == A_ABORT, answer
        assert raw.closed_by_node(TIMEOUT + 2)
    legitimate_echo(node.port)
    assert rss_kib(node) - rss < 50_000  # nothing the PDU claimed was buffered


@pytest.mark.parametrize("request_bytes,reason", [
    (associate_rq(application_context=False), 2),
    (associate_rq(calling=" "), 3),
    (associate_rq(called=" "), 7),
])
def test_association_requests_missing_what_they_must_have_are_rejected(node, request_bytes,
                                                                        reason):
    with Raw(node.port) as raw:
        raw.send(request_bytes)
        kind, body = raw.read_pdu()
        assert kind == A_ASSOCIATE_RJ and body[1] == 1 and body[3] == reason  # permanent
        assert raw.closed_by_node(3)
    legitimate_echo(node.port)


def test_truncated_headers_and_bogus_pdus_of_gone_peers_free_their_slots_at_once(node):
    for data in (b"\x01\x00\x00", pdu(0x01, b"\x00\x01junk")):
        for _ in range(11):
            with Raw(node.port) as raw:
                raw.send(data)
    held = [AE(ae_title="LEGIT") for _ in range(10)]
    associations = []
    for ae in held:  # every slot, at once: none is still held by a gone peer
        ae.add_requested_context(Verification)
        associations.append(ae.associate("127.0.0.1", node.port, ae_title="HARMONISE",
                                         bind_address=(LEGITIMATE, 0)))
    try:
        assert all(a.is_established for a in associations)
    finally:
        for a in associations:
            a.release()
    legitimate_echo(node.port)


def test_drips_and_silent_connections_keep_no_one_out(node):
    request = associate_rq()
    drippers = [Raw(node.port) for _ in range(11)]  # one host: 8 handshakes, 3 refused
    silent = [Raw(node.port, source="127.0.0.3") for _ in range(11)]
    stop = threading.Event()

    def drip(raw: Raw) -> None:
        try:
            for i in range(len(request)):
                if stop.is_set():
                    return
                raw.sock.sendall(request[i:i + 1])
                time.sleep(0.5)
        except OSError:
            return  # cut by the node

    threads = [threading.Thread(target=drip, args=(r,), daemon=True) for r in drippers]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        legitimate_echo(node.port)
        for _ in range(3):
            legitimate_echo(node.port)
            time.sleep(0.3)
        for raw in drippers + silent:  # cut once the handshake deadline has passed
            assert raw.closed_by_node(TIMEOUT + 3)
    finally:
        stop.set()
        for raw in drippers + silent:
            raw.close()
    assert node.events("connection_refused")
    assert {e["waiting_for"] for e in node.events("peer_too_slow")} == {"the A-ASSOCIATE-RQ"}
    legitimate_echo(node.port)


def test_a_pdu_trickled_after_the_handshake_is_cut_by_its_deadline(node):
    with established(node.port) as raw:
        raw.send(struct.pack(">BBL", 0x04, 0, 1000))
        started = time.monotonic()
        for _ in range(20):
            try:
                raw.sock.sendall(b"\x00")
            except OSError:
                break
            time.sleep(0.5)
        assert raw.closed_by_node(TIMEOUT + 3)
        assert time.monotonic() - started < TIMEOUT + 4
    legitimate_echo(node.port)


def test_connection_floods_and_abort_storms_leave_the_node_reachable(node):
    flood = []
    for _ in range(100):
        try:
            flood.append(socket.create_connection(("127.0.0.1", node.port), timeout=5))
        except OSError:
            break
    try:
        legitimate_echo(node.port)
    finally:
        for sock in flood:
            sock.close()
    for _ in range(50):  # associate and abort at once
        ae = AE(ae_title="STORM")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONISE",
                             bind_address=("127.0.0.4", 0))
        if assoc.is_established:
            assoc.abort()
    legitimate_echo(node.port)


def test_partial_uploads_leave_nothing_behind(node, tmp_path):
    [path] = write_series(tmp_path / "big", slices=1, size=1024, seed=41)  # 2 MiB of pixels
    ds = dcmread(path)
    sent = []

    def count(event: evt.Event) -> None:
        sent.append(1)
        if len(sent) == 12:  # some way into the data set: drop the connection
            threading.Thread(target=event.assoc.abort, daemon=True).start()

    ae = AE(ae_title="QUITTER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 16384
    assoc = ae.associate("127.0.0.1", node.port, ae_title="HARMONISE", max_pdu=16384,
                         evt_handlers=[(evt.EVT_PDU_SENT, count)])
    assoc.send_c_store(ds)
    # a TCP reset halfway through a data set: the raw way
    with established(node.port) as raw:
        command = bytes(64)
        raw.send(p_data(1, command, command=True, last=True))
        raw.send(p_data(1, b"\x08\x00\x16\x00UI" + b"\x00" * 1000, command=False, last=False))
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_for(lambda: incoming(node) == [], 5, what="incoming/ to empty")
    assert not indexed(node, str(ds.SOPInstanceUID))
    legitimate_echo(node.port)


def test_the_node_stayed_small_clean_readable_and_json(node):
    """Last in the module: what every case above left behind."""
    assert incoming(node) == []
    assert rss_kib(node) - node.rss_at_start < 150_000
    stored = sorted((node.tmp / "var" / "spool").rglob("*.dcm"))
    assert stored
    out = subprocess.run([dcmtk("dcmdump"), "-q", *map(str, stored)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in node.log.read_text(errors="replace").splitlines():
        json.loads(line)


def test_a_write_that_would_cross_the_disk_reserve_is_refused_and_removed(tmp_path):
    [path] = write_series(tmp_path / "big", slices=1, size=4096, seed=51)  # 32 MiB
    port = free_port()
    free_mib = shutil.disk_usage(tmp_path).free // 2**20
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var",
                          extra_node=f"max_pdu_size = {MAX_PDU}")
    config.write_text(config.read_text().replace("disk_reserve_mb = 1",
                                                 f"disk_reserve_mb = {free_mib - 12}"))
    node = NodeProcess(config, tmp_path / "node.log").start()
    node.port, node.tmp = port, tmp_path
    try:
        ae = AE(ae_title="BIG")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="HARMONISE")
        assert assoc.send_c_store(dcmread(path)).Status == 0xA700
        assoc.release()
        assert incoming(node) == []
        assert node.events("instance_receive_failed")
        legitimate_echo(port)
    finally:
        assert node.stop() == 0
    assert not list((tmp_path / "var" / "spool").rglob("*.dcm"))


def test_a_failed_write_aborts_its_association_and_leaves_nothing(tmp_path):
    """The file system failing under a data set as it arrives (here: a node whose files
    may not grow beyond 4 MiB, RLIMIT_FSIZE, so the write fails with EFBIG) aborts the
    association with A-ABORT; the partial file is gone and the node serves on."""
    [path] = write_series(tmp_path / "big", slices=1, size=2048, seed=61)  # 8 MiB
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var")
    node = NodeProcess(config, tmp_path / "node.log", file_size_limit=4 * 2**20).start()
    node.port, node.tmp = port, tmp_path
    try:
        ae = AE(ae_title="BIG")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="HARMONISE")
        assert "Status" not in assoc.send_c_store(dcmread(path))
        wait_for(lambda: assoc.is_aborted, 3, what="the A-ABORT to reach the sender")
        [failed] = node.events("instance_receive_failed")
        assert failed["aborted"] and failed["error_type"] == "OSError"
        wait_for(lambda: incoming(node) == [], 5, what="incoming/ to empty")
        legitimate_echo(port)
    finally:
        assert node.stop() == 0
