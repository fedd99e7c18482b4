"""Query/Retrieve against ``dicomnode serve``: dcmtk findscu/movescu/getscu, Orthanc C-MOVE,
C-CANCEL; originals and harmonised copies alike."""

from __future__ import annotations

import copy
import sqlite3
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.config import load_config
from dicomnode.scp.context import ScpContext
from dicomnode.scp.qr import handle_find
from dicomnode.store.index import Index
from tests.dicom_factory import write_series
from tests.nodeutil import (
    NodeProcess,
    dcmtk,
    dcmtk_env,
    free_port,
    getscu_study,
    wait_for,
    write_config,
)
from tests.orthanc import Orthanc, have_orthanc, seed_series

DERIVED_DESC = "Thorax B70f [harmonised: ct-test]"


def _patient(pid: str, name: str, date: str):
    def edit(ds, i):
        ds.PatientID, ds.PatientName, ds.StudyDate, ds.SeriesDate = pid, name, date, date
    return edit


@pytest.fixture(scope="module")
def qr(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qr")
    port, move_port, orthanc_port = free_port(), free_port(), free_port()
    peers = (f'[[peers]]\nae_title = "MOVESCU"\nhost = "127.0.0.1"\nport = {move_port}\n'
             f'[[peers]]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc_port}\n'
             f'[[peers]]\nae_title = "DOWN"\nhost = "127.0.0.1"\nport = {free_port()}\n')
    config = write_config(tmp / "node.toml", port, tmp / "var", extra=peers,
                          series_timeout=0.5)
    a = write_series(tmp / "a", slices=4, size=16, seed=1)
    derived_uid = generate_uid()

    def derive(ds, i):
        ds.SeriesDescription, ds.SeriesNumber = DERIVED_DESC, 1003
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    d = write_series(tmp / "d", slices=4, size=16, seed=1, series_uid=derived_uid, edit=derive)
    b = write_series(tmp / "b", modality="MR", slices=3, size=16, seed=2,
                     edit=_patient("OTHER02", "Other^Person", "20230615"))
    c = write_series(tmp / "c", slices=40, size=16, seed=3,
                     edit=_patient("BIG03", "Big^Series", "20220301"))
    uids = {name: seed_series(config, files, kind="original")
            for name, files in (("a", a), ("b", b), ("c", c))}
    uids["d"] = seed_series(config, d, kind="derived", source_series_uid=uids["a"])
    uids["study_a"] = str(dcmread(a[0]).StudyInstanceUID)
    uids["study_b"] = str(dcmread(b[0]).StudyInstanceUID)
    uids["study_c"] = str(dcmread(c[0]).StudyInstanceUID)
    node = NodeProcess(config, tmp / "node.log").start()
    node.port, node.move_port, node.orthanc_port, node.tmp, node.uids = (
        port, move_port, orthanc_port, tmp, uids)
    # originals complete and end 'unmatched' (no routes): a settled index to query
    def settled():
        db = sqlite3.connect(tmp / "var" / "index.sqlite")
        try:
            return db.execute("SELECT COUNT(*) FROM series WHERE state NOT IN"
                              " ('unmatched', 'archived')").fetchone()[0] == 0
        finally:
            db.close()
    wait_for(settled, 60, what="series to settle")
    yield node
    node.stop()


def findscu(node, *keys: str, model: str = "-S", out: Path) -> list[Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("findscu"), model, "-aec", "HARMONISE", "-X", "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    proc = subprocess.run([*args, "127.0.0.1", str(node.port)], capture_output=True,
                          text=True, timeout=60, env=dcmtk_env())
    assert proc.returncode == 0, proc.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_findscu_study_root_study_series_image(qr, tmp_path):
    u = qr.uids
    studies = findscu(qr, "QueryRetrieveLevel=STUDY", "PatientID=PHANTOM*", "StudyInstanceUID",
                      "StudyDate", "PatientName", "ModalitiesInStudy",
                      "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                      out=tmp_path / "study")
    assert [s.StudyInstanceUID for s in studies] == [u["study_a"]]
    [s] = studies
    assert s.ModalitiesInStudy == "CT" and s.StudyDate == "20240102"
    assert s.NumberOfStudyRelatedSeries == 2 and s.NumberOfStudyRelatedInstances == 8
    assert str(s.PatientName) == "Test^Phantom"

    series = findscu(qr, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={u['study_a']}",
                     "SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
                     "Manufacturer", "NumberOfSeriesRelatedInstances", "SeriesDate",
                     out=tmp_path / "series")
    by_uid = {x.SeriesInstanceUID: x for x in series}
    assert set(by_uid) == {u["a"], u["d"]}
    derived = by_uid[u["d"]]
    assert derived.Modality == "CT" and derived.SeriesDescription == DERIVED_DESC
    assert derived.SeriesNumber == 1003 and derived.Manufacturer == "SIEMENS"
    assert derived.NumberOfSeriesRelatedInstances == 4
    assert by_uid[u["a"]].SeriesNumber == 3

    images = findscu(qr, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={u['study_a']}",
                     f"SeriesInstanceUID={u['d']}", "SOPInstanceUID", "SOPClassUID",
                     "InstanceNumber", "ImageType", out=tmp_path / "image")
    assert sorted(i.InstanceNumber for i in images) == [1, 2, 3, 4]
    assert {i.SOPClassUID for i in images} == {CTImageStorage}
    assert all(list(i.ImageType)[:2] == ["DERIVED", "SECONDARY"] for i in images)


def test_findscu_patient_root_and_matching_rules(qr, tmp_path):
    u = qr.uids
    n = iter(range(100))

    def q(*keys, model="-S"):
        return findscu(qr, *keys, model=model, out=tmp_path / str(next(n)))

    patients = q("QueryRetrieveLevel=PATIENT", "PatientID", "PatientName",
                 "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances", model="-P")
    assert {p.PatientID: p.NumberOfPatientRelatedInstances for p in patients} == {
        "PHANTOM01": 8, "OTHER02": 3, "BIG03": 40}
    # Patient Root, study level under one patient
    assert [s.StudyInstanceUID for s in q("QueryRetrieveLevel=STUDY", "PatientID=OTHER02",
                                          "StudyInstanceUID", model="-P")] == [u["study_b"]]
    # PATIENT level is not part of Study Root
    proc = subprocess.run([dcmtk("findscu"), "-v", "-S", "-aec", "HARMONISE", "-k",
                           "QueryRetrieveLevel=PATIENT", "127.0.0.1", str(qr.port)],
                          capture_output=True, text=True, timeout=60, env=dcmtk_env())
    text = proc.stdout + proc.stderr
    assert "DataSetDoesNotMatchSOPClass" in text, text

    def studies(*keys):
        return {s.StudyInstanceUID for s in q("QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                                              *keys)}
    assert studies("PatientName=other*") == {u["study_b"]}  # PN: case-insensitive wildcard
    assert studies("PatientID=PHANTOM0?") == {u["study_a"]}
    assert studies("PatientID=PHANTOM0") == set()  # single value: exact
    assert studies("StudyDate=20230101-20241231") == {u["study_a"], u["study_b"]}
    assert studies("StudyDate=-20221231") == {u["study_c"]}
    assert studies("StudyDate=20240102-") == {u["study_a"]}
    assert studies("StudyDate=20230615") == {u["study_b"]}
    assert studies("StudyTime=1000-1100") == {u["study_a"], u["study_b"], u["study_c"]}
    assert studies("StudyTime=1100-") == set()
    assert studies(f"StudyInstanceUID={u['study_a']}\\{u['study_c']}") == {u["study_a"],
                                                                          u["study_c"]}
    assert studies("ModalitiesInStudy=MR") == {u["study_b"]}
    assert studies("AccessionNumber=ACC1") == {u["study_a"], u["study_b"], u["study_c"]}
    series = {s.SeriesInstanceUID for s in q("QueryRetrieveLevel=SERIES", "SeriesInstanceUID",
                                             "SeriesDescription=*harmonised*")}
    assert series == {u["d"]}
    series = {s.SeriesInstanceUID for s in q("QueryRetrieveLevel=SERIES", "SeriesInstanceUID",
                                             "SeriesDescription=*[harmonised: ct-test]")}
    assert series == {u["d"]}  # brackets are literal characters, not a character class
    series = {s.SeriesInstanceUID for s in q("QueryRetrieveLevel=SERIES", "SeriesInstanceUID",
                                             "Modality=CT", "SeriesNumber=3")}
    assert series == {u["a"], u["c"]}


def test_movescu_series_pending_counts_and_unknown_destination(qr, tmp_path):
    u = qr.uids
    out = tmp_path / "moved"
    out.mkdir()
    base = [dcmtk("movescu"), "-S", "-d", "-aet", "MOVESCU", "-aec", "HARMONISE",
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={u['study_a']}",
            "-k", f"SeriesInstanceUID={u['d']}"]
    proc = subprocess.run([*base, "-aem", "MOVESCU", "--port", str(qr.move_port), "-od",
                           str(out), "127.0.0.1", str(qr.port)], capture_output=True,
                          text=True, timeout=120, env=dcmtk_env())
    assert proc.returncode == 0, proc.stderr
    got = sorted(dcmread(p).SOPInstanceUID for p in out.iterdir())
    assert len(got) == 4
    assert {dcmread(p).SeriesInstanceUID for p in out.iterdir()} == {u["d"]}
    log = proc.stdout + proc.stderr
    assert "Remaining Suboperations       : 3" in log and "Pending" in log, log

    bad = subprocess.run([*base, "-aem", "NOWHERE", "127.0.0.1", str(qr.port)],
                         capture_output=True, text=True, timeout=60, env=dcmtk_env())
    text = bad.stdout + bad.stderr
    assert "0xa801" in text.lower() or "Move Destination Unknown" in text, text
    assert qr.events("move_destination_unknown")

    # no SeriesInstanceUID at SERIES level would select every series: refused, nothing sent
    everything = [*base[:-2], "-k", "SeriesInstanceUID=", "-aem", "MOVESCU", "--port",
                  str(qr.move_port), "-od", str(out), "127.0.0.1", str(qr.port)]
    refused = subprocess.run(everything, capture_output=True, text=True, timeout=60,
                             env=dcmtk_env())
    text = refused.stdout + refused.stderr
    assert "0xa900" in text.lower() and "retrieve needs SeriesInstanceUID" in text, text
    assert len(list(out.iterdir())) == 4

    # a configured destination that is down is not "unknown": a failure, and a log event
    down = subprocess.run([*base, "-aem", "DOWN", "127.0.0.1", str(qr.port)],
                          capture_output=True, text=True, timeout=60, env=dcmtk_env())
    text = down.stdout + down.stderr
    assert "0xc514" in text.lower() and "0xa801" not in text.lower(), text
    [event] = qr.events("move_destination_unreachable")
    assert event["destination"] == "DOWN" and event["instances"] == 4
    assert "association with DOWN" in event["reason"]

    # the identifier is judged before the destination: a refused one is refused (0xA900)
    # whether its destination is down, unknown or up
    for destination in ("DOWN", "NOWHERE"):
        refused = subprocess.run([*base[:-2], "-k", "SeriesInstanceUID=*", "-aem", destination,
                                  "127.0.0.1", str(qr.port)], capture_output=True, text=True,
                                 timeout=60, env=dcmtk_env())
        text = refused.stdout + refused.stderr
        assert "0xa900" in text.lower(), text
        assert "0xa801" not in text.lower() and "0xc514" not in text.lower(), text


def test_getscu_study(qr, tmp_path):
    out = tmp_path / "got"
    proc = getscu_study(qr.port, qr.uids["study_b"], out)
    assert proc.returncode == 0, proc.stderr
    files = [dcmread(p) for p in out.iterdir()]
    assert len(files) == 3 and {f.Modality for f in files} == {"MR"}


def test_c_get_cancel_stops_sub_operations(qr):
    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="CANCELSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", qr.port, ae_title="HARMONISE",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = qr.uids["study_c"], qr.uids["c"]
    cx = next(c for c in assoc.accepted_contexts
              if c.abstract_syntax == StudyRootQueryRetrieveInformationModelGet)
    statuses = []
    for rsp, _ in assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet,
                                      msg_id=7):
        statuses.append(rsp)
        if rsp.Status == 0xFF00 and len(statuses) == 2:
            assoc.send_c_cancel(7, cx.context_id)
    assoc.release()
    final = statuses[-1]
    assert final.Status == 0xFE00, [hex(s.Status) for s in statuses]
    assert 0 < len(received) < 40
    assert final.NumberOfRemainingSuboperations > 0
    assert qr.events("get_cancelled")


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A node holding one long series: a cancel sent after the first responses always
    arrives long before the last one would have been sent."""
    tmp = tmp_path_factory.mktemp("many")
    port, move_port = free_port(), free_port()
    config = write_config(tmp / "node.toml", port, tmp / "var", extra=(
        f'[[peers]]\nae_title = "MOVESCU"\nhost = "127.0.0.1"\nport = {move_port}\n'))
    files = write_series(tmp / "s", slices=1000, size=8, seed=4)
    uid = seed_series(config, files, kind="original")
    node = NodeProcess(config, tmp / "node.log").start()
    node.port, node.move_port = port, move_port
    node.query = Dataset()
    node.query.QueryRetrieveLevel = "SERIES"
    node.query.StudyInstanceUID = str(dcmread(files[0]).StudyInstanceUID)
    node.query.SeriesInstanceUID = uid
    yield node
    node.stop()


def cancelled_after_two(assoc, responses, msg_id: int, sop_class) -> list[Any]:
    """Collect responses, sending C-CANCEL once two Pending ones have arrived."""
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class)
    got = []
    for rsp, _ in responses:
        got.append(rsp)
        if rsp.Status == 0xFF00 and len(got) == 2:
            assoc.send_c_cancel(msg_id, cx.context_id)
    return got


class CancelAfter:
    """A C-FIND event whose C-CANCEL arrives after ``n`` checks of ``is_cancelled``."""

    def __init__(self, identifier: Dataset, n: int) -> None:
        self.identifier, self.n = identifier, n
        self.request = SimpleNamespace(
            AffectedSOPClassUID=StudyRootQueryRetrieveInformationModelFind)
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="CANCELSCU"))

    @property
    def is_cancelled(self) -> bool:
        self.n -= 1
        return self.n < 0


def test_c_find_cancel_stops_the_responses(many):
    # Over the network this races: pynetdicom's reactor sends every queued response
    # before it reads the next PDU, and drops a cancel that arrives before the request
    # is being served; so the handler is driven directly, as pynetdicom drives it.
    query = copy.deepcopy(many.query)  # update() would share, and change, its elements
    query.QueryRetrieveLevel, query.SOPInstanceUID = "IMAGE", ""
    config = load_config(many.config)
    index = Index(config.index_path)
    try:
        got = [status for status, _ in handle_find(CancelAfter(query, 2),
                                                   ScpContext(config, index))]
    finally:
        index.close()
    assert got == [0xFF00, 0xFF00, 0xFE00]  # of 1000 matches


def test_c_move_cancel_stops_sub_operations(many):
    received = []
    scp = AE(ae_title="MOVESCU")
    scp.add_supported_context(CTImageStorage)
    server = scp.start_server(("127.0.0.1", many.move_port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda e: received.append(e.request.AffectedSOPInstanceUID) or 0)])
    try:
        ae = AE(ae_title="MOVESCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", many.port, ae_title="HARMONISE")
        assert assoc.is_established
        move = StudyRootQueryRetrieveInformationModelMove
        got = cancelled_after_two(assoc, assoc.send_c_move(many.query, "MOVESCU", move,
                                                           msg_id=11), 11, move)
        assoc.release()
    finally:
        server.shutdown()
    final = got[-1]
    assert final.Status == 0xFE00, [hex(r.Status) for r in got]
    assert 0 < len(received) < 1000 and final.NumberOfRemainingSuboperations > 0
    assert many.events("move_cancelled")


@pytest.mark.skipif(not have_orthanc(), reason="Orthanc not installed")
def test_orthanc_c_finds_and_c_moves_harmonised_series(qr):
    u = qr.uids
    orthanc = Orthanc(qr.tmp / "orthanc", dicom_port=qr.orthanc_port,
                      modalities={"HARMONISE": ("127.0.0.1", qr.port)}).start()
    try:
        answers = orthanc.post("/modalities/HARMONISE/query", {
            "Level": "Series", "Query": {"StudyInstanceUID": u["study_a"],
                                         "SeriesDescription": "*harmonised*"}})
        found = orthanc.get(f"{answers['Path']}/answers?expand")
        assert [a["0020,000e"]["Value"] for a in found] == [u["d"]]
        orthanc.post("/modalities/HARMONISE/move", {
            "Level": "Series", "TargetAet": "ORTHANC",
            "Resources": [{"StudyInstanceUID": u["study_a"], "SeriesInstanceUID": u["d"]}]},
            timeout=120)
        instances = orthanc.wait_instances(4, timeout=60)
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in instances} == {
            str(dcmread(p).SOPInstanceUID) for p in (qr.tmp / "d").iterdir()}
        tags = orthanc.tags(instances[0]["ID"])
        assert tags["SeriesInstanceUID"] == u["d"]
        assert tags["SeriesDescription"] == DERIVED_DESC
        assert tags["ImageType"].startswith("DERIVED\\SECONDARY")
        # Orthanc's query-then-retrieve (its UI's flow) builds each C-MOVE identifier from
        # the answer: StudyInstanceUID with PatientID and AccessionNumber beside it
        study = orthanc.post("/modalities/HARMONISE/query", {
            "Level": "Study", "Query": {"PatientID": "PHANTOM*"}})
        orthanc.post(f"{study['Path']}/retrieve", {"TargetAet": "ORTHANC",
                                                    "Synchronous": True}, timeout=120)
        orthanc.wait_instances(8, timeout=60)
    finally:
        orthanc.stop()
    move = [e for e in qr.events("move") if e["destination"] == "ORTHANC"]
    assert [e["instances"] for e in move[-2:]] == [4, 8]  # the series, then its study


def test_an_unreadable_file_is_one_failed_sub_operation_of_c_get_and_c_move(tmp_path):
    port, scp_port = free_port(), free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var", extra=(
        f'[[peers]]\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {scp_port}\n'))
    files = write_series(tmp_path / "s", slices=3, size=16)
    uid = seed_series(config, files, kind="original")
    db = sqlite3.connect(tmp_path / "var" / "index.sqlite")
    [(broken, path)] = db.execute("SELECT sop_instance_uid, path FROM instances"
                                  " WHERE instance_number = 2").fetchall()
    study = db.execute("SELECT study_uid FROM series").fetchone()[0]
    db.close()
    (tmp_path / "var" / path).write_bytes(b"\x00" * 64 + b"Test^Phantom")
    out = tmp_path / "storescp"
    out.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-aet", "STORESCP", "+uf", "-od", str(out),
                            str(scp_port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    node = NodeProcess(config, tmp_path / "node.log").start()
    got = []
    try:
        ae = AE(ae_title="GETSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="HARMONISE",
                             ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, lambda e: got.append(
                                 e.request.AffectedSOPInstanceUID) or 0x0000)])
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid
        get = [rsp for rsp, _ in assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet)]
        move = [rsp for rsp, _ in assoc.send_c_move(
            ds, "STORESCP", StudyRootQueryRetrieveInformationModelMove)]
        assoc.release()
    finally:
        node.stop()
        scp.terminate()
        scp.wait(10)
    for final in (get[-1], move[-1]):
        assert final.Status == 0xB000  # sub-operations complete, one or more failed
        assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
            2, 1)
    assert len(got) == 2 and broken not in got
    assert len(list(out.iterdir())) == 2
    unavailable = node.events("retrieve_instance_unavailable")
    assert [(e["sop_instance_uid"], e["error_type"]) for e in unavailable] == [
        (broken, "InvalidDicomError")] * 2
    assert "Test^Phantom" not in node.log.read_text()
