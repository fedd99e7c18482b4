"""Storage commitment (Push Model) with a real requester: Orthanc sends a study to the node,
asks it to commit, and receives the report on a new association; the request survives
kill -9 while the requester cannot be reached; malformed or unanswerable requests are
refused with their status."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel

from dicomnode.config import load_config
from dicomnode.dispatch import commitment
from dicomnode.net.commitment import WELL_KNOWN_INSTANCE, event_information, reference_item
from dicomnode.store.commitments import summary
from dicomnode.store.index import Index
from tests.dicom_factory import write_series
from tests.nodeutil import NodeProcess, cli, free_port, storescu, wait_for, write_config
from tests.orthanc import Orthanc, have_orthanc, seed_series

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
FAST_RETRY = """
[outbox]
retry_initial = 0.2
retry_max_interval = 0.5
poll_interval = 0.2
"""


def node_config(tmp: Path, port: int, orthanc_port: int, series_timeout: float = 1.5) -> Path:
    peer = f'[[peers]]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc_port}\n'
    return write_config(tmp / "node.toml", port, tmp / "var", extra=FAST_RETRY + peer,
                        series_timeout=series_timeout)


def references(files: list[Path]) -> list[dict[str, str]]:
    return [{"SOPClassUID": str(ds.SOPClassUID), "SOPInstanceUID": str(ds.SOPInstanceUID)}
            for ds in map(dcmread, files)]


def request_commitment(orthanc: Orthanc, refs: list[dict[str, str]]) -> str:
    """Have Orthanc ask the node to commit to ``refs``; the transaction UID."""
    return orthanc.post("/modalities/HARMONISE/storage-commitment",
                        {"DicomInstances": refs})["ID"]


def report(orthanc: Orthanc, transaction: str) -> dict:
    """The node's report on ``transaction`` in Orthanc, once it is in."""
    path = f"/storage-commitment/{transaction}"
    return wait_for(lambda: (r := orthanc.get(path))["Status"] != "Pending" and r, 30,
                    what="the storage commitment report in Orthanc")


def by_instance(items: list[dict]) -> dict[str, dict]:
    return {i["SOPInstanceUID"]: i for i in items}


@pytest.mark.skipif(not have_orthanc(), reason="Orthanc not installed")
def test_orthanc_sends_a_study_asks_for_commitment_and_gets_the_report(tmp_path):
    port, orthanc_port = free_port(), free_port()
    config = node_config(tmp_path, port, orthanc_port)
    files = write_series(tmp_path / "ct", slices=4, size=32)
    never_sent = {"SOPClassUID": CT, "SOPInstanceUID": generate_uid()}
    wrong_class = {**references(files[:1])[0], "SOPClassUID": MR}
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port,
                      modalities={"HARMONISE": ("127.0.0.1", port)}).start()
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        storescu(orthanc_port, files)
        [study] = orthanc.get("/studies")
        # as a modality does: send the study, then ask for commitment of what was sent
        job = orthanc.post("/modalities/HARMONISE/store",
                           {"Resources": [study], "StorageCommitment": True}, timeout=120)
        complete = report(orthanc, job["StorageCommitmentTransactionUID"])
        partial = report(orthanc, request_commitment(
            orthanc, [*references(files[1:]), never_sent, wrong_class]))
    finally:
        node.stop()
        orthanc.stop()
    assert complete["Status"] == "Success" and not complete["Failures"]
    assert by_instance(complete["Success"]).keys() == {r["SOPInstanceUID"]
                                                       for r in references(files)}
    assert partial["Status"] == "Failure"
    assert len(partial["Success"]) == 3
    failures = by_instance(partial["Failures"])
    assert failures[never_sent["SOPInstanceUID"]]["FailureReason"] == 0x0112
    assert failures[wrong_class["SOPInstanceUID"]]["FailureReason"] == 0x0119
    reported = node.events("commitment_reported")
    assert [(e["committed"], e["failed"]) for e in reported] == [(4, 0), (3, 2)]
    assert all(e["destination"] == "ORTHANC" for e in reported)
    index = Index(load_config(config).index_path)
    try:  # a reported request keeps its counts, not its instance list
        kept = index.db.execute("SELECT refs, committed, failed FROM commitments").fetchall()
    finally:
        index.close()
    assert sorted(tuple(r) for r in kept) == [("[]", 3, 2), ("[]", 4, 0)]
    summary = json.loads(cli("status", "--config", str(config), "--json").stdout)
    assert summary["commitments"] == {"states": {"reported": 2}, "last_error": None}
    assert "storage commitment requests: 2 reported" in cli("status", "--config",
                                                           str(config)).stdout


@pytest.mark.skipif(not have_orthanc(), reason="Orthanc not installed")
def test_an_instance_still_arriving_when_asked_is_waited_for(tmp_path):
    """A modality may ask for commitment while its last instance is still in flight on
    another association: the node waits (up to series_timeout) before reporting it failed."""
    port, orthanc_port = free_port(), free_port()
    config = node_config(tmp_path, port, orthanc_port, series_timeout=8)
    files = write_series(tmp_path / "ct", slices=3, size=32)
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port,
                      modalities={"HARMONISE": ("127.0.0.1", port)}).start()
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        storescu(port, files[:2], aet="ORTHANC")
        transaction = request_commitment(orthanc, references(files))
        wait_for(lambda: node.events("commitment_requested"), 10, what="the request")
        time.sleep(1.0)  # five report passes (poll_interval 0.2 s) while it is missing
        storescu(port, files[2:], aet="ORTHANC")
        done = report(orthanc, transaction)
    finally:
        node.stop()
        orthanc.stop()
    assert done["Status"] == "Success" and len(done["Success"]) == 3


@pytest.mark.skipif(not have_orthanc(), reason="Orthanc not installed")
def test_a_request_survives_kill_9_while_the_requester_is_unreachable(tmp_path):
    """The node takes the request, cannot reach the requester (its [[peers]] port is
    wrong), is killed; restarted with the right port, it reports."""
    port, orthanc_port = free_port(), free_port()
    config = node_config(tmp_path, port, orthanc_port=free_port())
    files = write_series(tmp_path / "ct", slices=3, size=32)
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=orthanc_port,
                      modalities={"HARMONISE": ("127.0.0.1", port)}).start()
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        storescu(port, files, aet="ORTHANC")
        transaction = request_commitment(orthanc, references(files))
        wait_for(lambda: node.events("commitment_report_retry"), 30, what="a failed report")
        assert node.stop(signal.SIGKILL) == -signal.SIGKILL
        assert orthanc.get(f"/storage-commitment/{transaction}")["Status"] == "Pending"
        status = cli("status", "--config", str(config)).stdout
        assert "storage commitment requests: 1 pending  error=report to ORTHANC:" in status
        config = node_config(tmp_path, port, orthanc_port)
        node.start()
        done = report(orthanc, transaction)
    finally:
        node.stop()
        orthanc.stop()
    assert done["Status"] == "Success" and len(done["Success"]) == 3


def n_action(port: int, aet: str, info: Dataset | None, action_type: int = 1,
             instance: str = WELL_KNOWN_INSTANCE) -> Dataset:
    ae = AE(ae_title=aet)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONISE")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(info, action_type, StorageCommitmentPushModel,
                                        instance)
    finally:
        assoc.release()
    return status


def request(*refs: tuple[str, str]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    ds.ReferencedSOPSequence = [reference_item(cls, uid) for cls, uid in refs]
    return ds


def test_requests_the_node_cannot_take_are_refused_with_their_status(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, tmp_path / "var",
                          extra='[[peers]]\nae_title = "SENDONLY"\nhost = "127.0.0.1"\n')
    good = request((CT, generate_uid()))
    empty = request()
    anonymous = request((CT, generate_uid()))
    del anonymous.TransactionUID
    node = NodeProcess(config, tmp_path / "node.log").start()
    try:
        cases = {
            "not a peer": n_action(port, "LOOPBACK", good),  # accepted: any loopback AE
            "peer without a port": n_action(port, "SENDONLY", good),
            "action 2": n_action(port, "SENDONLY", good, action_type=2),
            "empty": n_action(port, "SENDONLY", empty),
            "no transaction": n_action(port, "SENDONLY", anonymous),
            "other instance": n_action(port, "SENDONLY", good, instance=generate_uid()),
        }
    finally:
        node.stop()
    codes = {name: int(status.Status) for name, status in cases.items()}
    assert codes == {"not a peer": 0x0110, "peer without a port": 0x0110, "action 2": 0x0123,
                     "empty": 0x0115, "no transaction": 0x0115, "other instance": 0x0112}
    assert cases["not a peer"].ErrorComment == "no [[peers]] port for LOOPBACK to report to"
    assert cases["empty"].ErrorComment == "empty Referenced SOP Sequence"
    assert len(node.events("commitment_refused")) == 6
    index = Index(load_config(config).index_path)
    try:
        assert summary(index)["states"] == {}
    finally:
        index.close()


def test_an_instance_is_committed_only_while_indexed_under_its_class_with_its_file(tmp_path):
    config_path = write_config(tmp_path / "node.toml", free_port(), tmp_path / "var")
    files = write_series(tmp_path / "ct", slices=3, size=32)
    seed_series(config_path, files, kind="original")
    config = load_config(config_path)
    index = Index(config.index_path)
    try:
        kept, purged, conflicting = [(r["SOPClassUID"], r["SOPInstanceUID"])
                                     for r in references(files)]
        (config.node.data_dir / index.instance(purged[1])["path"]).unlink()
        verdict = commitment.judge(config, index, [kept, purged, (MR, conflicting[1]),
                                                   (CT, "1.2.3")])
    finally:
        index.close()
    assert verdict.committed == [kept]
    assert verdict.failed == [(*purged, 0x0112), (MR, conflicting[1], 0x0119),
                              (CT, "1.2.3", 0x0112)]
    info = event_information("1.2.3.4", verdict, "HARMONISE")
    assert info.TransactionUID == "1.2.3.4" and info.RetrieveAETitle == "HARMONISE"
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == [kept[1]]
    assert [i.FailureReason for i in info.FailedSOPSequence] == [0x0112, 0x0119, 0x0112]
