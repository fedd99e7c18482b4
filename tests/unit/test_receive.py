"""Receiving one instance without a network: the index always describes the file on disk."""

from __future__ import annotations

import hashlib
import threading
import tracemalloc
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from dicomnode.config import load_config
from dicomnode.store.files import StorageFull
from dicomnode.store.index import Index
from dicomnode.store.ingest import RejectedInstance, parse_header, receive_file, receive_instance
from dicomnode.store.recovery import reconcile
from tests.dicom_factory import RAW_DATA_STORAGE, raw_data, write_series
from tests.nodeutil import free_port, write_config


def encoded(ds, tmp_path: Path) -> bytes:
    """``ds`` as the bytes of a DICOM file (preamble and file meta included)."""
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    return (tmp_path / "x.dcm").read_bytes()


@pytest.fixture
def node(tmp_path: Path):
    config = load_config(write_config(tmp_path / "node.toml", free_port(), tmp_path / "var"))
    index = Index(config.index_path)
    [path] = write_series(tmp_path / "in", slices=1, size=16)
    ds = dcmread(path)
    variants = []
    for value in range(41):  # the same SOP Instance UID with other bytes
        ds.PixelData = bytes([value]) * len(ds.PixelData)
        variants.append(encoded(ds, tmp_path))
    yield config, index, variants
    index.close()


def store(config, index, data: bytes):
    return receive_instance(data, parse_header(data), index=index,
                            data_dir=config.node.data_dir, root=config.spool_dir,
                            reserve_bytes=0, duplicate_policy="replace")


def consistent(config, index) -> bytes:
    """The one file of the instance on disk, checked against its index row."""
    [row] = index.db.execute("SELECT * FROM instances").fetchall()
    [on_disk] = config.spool_dir.rglob("*.dcm")
    assert str(on_disk.relative_to(config.node.data_dir)) == row["path"]
    data = on_disk.read_bytes()
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (row["sha256"], row["size"])
    return data


def test_concurrent_replacements_of_one_uid_leave_index_and_file_in_step(node):
    config, index, variants = node
    store(config, index, variants[0])
    errors: list[Exception] = []

    def send(start: threading.Barrier, data: bytes) -> None:
        start.wait()
        try:
            store(config, index, data)  # each thread: its own connection
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            index.close()

    for n in range(1, 41, 2):  # two new contents at once, both replacing the stored one
        start = threading.Barrier(2)
        threads = [threading.Thread(target=send, args=(start, v)) for v in variants[n:n + 2]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert consistent(config, index) in variants[n:n + 2]


def test_a_crash_between_writing_a_replacement_and_indexing_it(node, monkeypatch):
    config, index, (first, second, *_) = node
    store(config, index, first)

    def crash(*args, **kw):
        raise SystemExit("killed")  # the process dies before the commit
    with monkeypatch.context() as m:
        m.setattr(index, "add_instance", crash)
        with pytest.raises(SystemExit):
            store(config, index, second)
    assert len(list(config.spool_dir.rglob("*.dcm"))) == 2  # the index still has the first
    assert reconcile(index, config)["superseded_removed"] == 1
    assert consistent(config, index) == first  # never acknowledged: the peer resends it
    assert store(config, index, second).action == "replaced"
    assert consistent(config, index) == second


def test_a_crash_after_indexing_a_replacement_before_removing_the_old_copy(node):
    config, index, (first, second, *_) = node
    old = store(config, index, first).path
    store(config, index, second)
    old.write_bytes(first)  # as if the process died before unlinking it
    assert reconcile(index, config) == {"temp_removed": 0, "superseded_removed": 1,
                                        "files_adopted": 0}
    assert consistent(config, index) == second


def test_a_file_received_elsewhere_is_moved_into_place_and_duplicates_need_no_space(node):
    """The network path: pynetdicom wrote the data set to a file; it is parsed from the
    file and renamed into the spool. Below the disk reserve a new instance is refused,
    an identical resend is still acknowledged (it needs no space)."""
    config, index, variants = node
    incoming = config.node.data_dir / "incoming"
    incoming.mkdir()

    def received(data: bytes, reserve: int):
        source = incoming / "tmp0.dcm"
        source.write_bytes(data)
        record = parse_header(data)
        return receive_file(source, index=index, data_dir=config.node.data_dir,
                            root=config.spool_dir, reserve_bytes=reserve,
                            duplicate_policy="replace", transfer_syntax=record.transfer_syntax,
                            affected_sop_class=record.sop_class_uid,
                            affected_sop_instance=record.sop_instance_uid)
    assert received(variants[0], 0).action == "stored"
    assert not (incoming / "tmp0.dcm").exists()  # moved, not copied
    assert consistent(config, index) == variants[0]
    everything = 2**62
    assert received(variants[0], everything).action == "duplicate"
    with pytest.raises(StorageFull):
        received(variants[1], everything)
    assert consistent(config, index) == variants[0]


def test_a_large_private_payload_is_stored_without_being_read_into_memory(node, tmp_path):
    """A scanner's raw data object keeps hundreds of MB in private tags, before any pixel
    data (it has none): only the header is parsed, the rest streams through sha256."""
    config, index, _ = node
    raw = raw_data(dcmread(write_series(tmp_path / "mr", modality="MR", slices=1)[0]))
    payload = 64 * 2**20
    raw.private_block(0x2005, "Philips MR Imaging DD 001").add_new(0x11, "OB", bytes(payload))
    source = config.node.data_dir / "incoming" / "tmp0.dcm"
    source.parent.mkdir()
    raw.save_as(source, enforce_file_format=True)
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    tracemalloc.start()
    try:
        outcome = receive_file(source, index=index, data_dir=config.node.data_dir,
                               root=config.spool_dir, reserve_bytes=0,
                               duplicate_policy="replace",
                               transfer_syntax=ExplicitVRLittleEndian,
                               affected_sop_class=RAW_DATA_STORAGE,
                               affected_sop_instance=raw.SOPInstanceUID)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome.action == "stored" and outcome.record.sop_class_uid == RAW_DATA_STORAGE
    assert consistent(config, index) and index.instance(raw.SOPInstanceUID)["sha256"] == expected
    assert peak < payload / 8


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")  # the node reads with IGNORE
def test_pixel_data_is_checked_against_the_header_without_decoding(tmp_path):
    """Cut native pixel data and encapsulated syntaxes without fragments are refused when
    received, with the sizes in the message; odd-length data padded to even is fine."""
    [path] = write_series(tmp_path / "in", slices=1, size=16)
    ds = dcmread(path)
    ds.PixelData = ds.PixelData[:-2]
    with pytest.raises(RejectedInstance, match="PixelData has 510 bytes; .* need 512"):
        parse_header(encoded(ds, tmp_path))
    ds = dcmread(path)
    with pytest.raises(RejectedInstance, match="defined length .* encapsulated fragments"):
        parse_header(encoded(ds, tmp_path), JPEG2000Lossless)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.Rows, ds.Columns = 8, 8, 7, 3, 3
    ds.PixelData = bytes(9) + b"\0"  # 9 bytes padded to 10
    assert parse_header(encoded(ds, tmp_path)).sop_instance_uid == ds.SOPInstanceUID
    # NumberOfFrames "1A", as in pydicom's badVR.dcm: the expected length cannot be known
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 2, b"1A", 0, False, True)
    with pytest.raises(RejectedInstance, match="^PixelData with an unreadable NumberOfFrames$"
                       ) as caught:
        parse_header(encoded(ds, tmp_path))
    assert (caught.value.tag, caught.value.error) == ("(0028,0008)", "ValueError")
