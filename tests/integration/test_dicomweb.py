"""DICOMweb against a running node with the dicomweb-client package as the client: STOW-RS
through the durable receive path (audited, broken instances refused as a C-STORE would
be), QIDO-RS answering as C-FIND does, WADO-RS giving back what was stored."""

from __future__ import annotations

import io
import json

import numpy as np
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from tests.dicom_factory import write_series
from tests.nodeutil import status
from tests.webutil import audit_entries, web_node


def c_find(port: int, level: str, **keys: str) -> set[str]:
    """The unique keys of what the node's C-FIND SCP answers (pynetdicom SCU)."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONISE")
    query = Dataset()
    query.QueryRetrieveLevel = level
    unique = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}[level]
    setattr(query, unique, "")
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    try:
        return {str(getattr(ds, unique)) for rsp, ds in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind) if ds is not None}
    finally:
        assoc.release()


def uids(results: list[dict], tag: str) -> set[str]:
    return {r[tag]["Value"][0] for r in results}


def test_dicomweb_client_stores_queries_and_retrieves(tmp_path, start_node):
    node, base = web_node(start_node, tmp_path)
    client = DICOMwebClient(base + "/dicomweb")
    ct = write_series(tmp_path / "ct", slices=4, size=32, kernel="B30f", seed=21)
    mr = write_series(tmp_path / "mr", modality="MR", slices=3, size=32, seed=22,
                      description="AX T1 SE")
    stored = client.store_instances([dcmread(p) for p in ct + mr])
    assert len(stored.ReferencedSOPSequence) == 7 and "FailedSOPSequence" not in stored
    [audit] = audit_entries(tmp_path / "var")
    assert (audit["action"], audit["outcome"]) == ("stow", "7 stored, 0 refused")
    rows = status(node.config)
    first = dcmread(ct[0])
    assert rows[first.SeriesInstanceUID]["instances"] == 4  # indexed as a C-STORE is
    for p in ct:  # stored byte for byte
        ds = dcmread(p)
        [kept] = (tmp_path / "var" / "spool").rglob(f"{ds.SOPInstanceUID}.dcm")
        assert kept.read_bytes() == p.read_bytes()

    # QIDO-RS: the same answers as C-FIND
    for level, keys in (("SERIES", {"Modality": "MR"}), ("SERIES", {"Modality": "CT"}),
                        ("SERIES", {"SeriesDescription": "AX*"}),
                        ("STUDY", {"StudyInstanceUID": first.StudyInstanceUID}),
                        ("STUDY", {"PatientID": str(first.PatientID)})):
        search = client.search_for_series if level == "SERIES" else client.search_for_studies
        tag = "0020000E" if level == "SERIES" else "0020000D"
        found = uids(search(search_filters=keys), tag)
        assert found == c_find(node.port, level, **keys) and found, (level, keys)
    [series] = client.search_for_series(first.StudyInstanceUID,
                                        search_filters={"Modality": "CT"})
    assert series["00201209"]["Value"] == [4]  # NumberOfSeriesRelatedInstances
    assert series["00081190"]["Value"][0].endswith(f"/series/{first.SeriesInstanceUID}")
    instances = client.search_for_instances(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert uids(instances, "00080018") == {str(dcmread(p).SOPInstanceUID) for p in ct}
    paged = requests.get(base + "/dicomweb/instances?limit=2&offset=1", timeout=60)
    assert len(paged.json()) == 2 and "additional results" in paged.headers["Warning"]
    assert requests.get(base + "/dicomweb/series?NotAKeyword=1", timeout=60).status_code == 400

    # WADO-RS: instances as stored, metadata, frames, rendered
    got = client.retrieve_series(first.StudyInstanceUID, first.SeriesInstanceUID,
                                 media_types=(("application/dicom", "*"),))
    assert sorted(d.SOPInstanceUID for d in got) == sorted(dcmread(p).SOPInstanceUID for p in ct)
    sent = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in ct}
    assert all(np.array_equal(d.pixel_array, sent[d.SOPInstanceUID].pixel_array) for d in got)
    default = client.retrieve_instance(first.StudyInstanceUID, first.SeriesInstanceUID,
                                       first.SOPInstanceUID)
    assert default.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    metadata = client.retrieve_series_metadata(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert len(metadata) == 4 and all("7FE00010" not in m for m in metadata)
    [frame] = client.retrieve_instance_frames(first.StudyInstanceUID, first.SeriesInstanceUID,
                                              first.SOPInstanceUID, [1])
    assert frame == first.pixel_array.astype(first.pixel_array.dtype.newbyteorder("<")).tobytes()
    png = client.retrieve_instance_rendered(first.StudyInstanceUID, first.SeriesInstanceUID,
                                            first.SOPInstanceUID, media_types=("image/png",))
    assert Image.open(io.BytesIO(png)).size == (32, 32)
    assert requests.get(base + f"/dicomweb/studies/{first.StudyInstanceUID}/series/1.2.3",
                        timeout=60).status_code == 404

    # a broken instance is refused as a C-STORE would refuse it (0xC000), nothing written
    broken = tmp_path / "broken.dcm"
    raw = write_series(tmp_path / "b", slices=1, size=32, seed=23)[0].read_bytes()
    broken.write_bytes(raw[:-100])
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + broken.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    refused = requests.post(base + "/dicomweb/studies", data=body, timeout=60, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert refused.status_code == 409
    [failed] = json.loads(refused.text)["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    assert not list((tmp_path / "var" / "incoming").iterdir())
    assert audit_entries(tmp_path / "var")[-1]["outcome"] == "0 stored, 1 refused"
    assert node.stop() == 0
