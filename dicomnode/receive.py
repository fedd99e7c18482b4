"""Receiving one instance: parse its header, store its bytes durably, index it.

Kept apart from the network handler so it can be called (and tested) with plain
bytes; the handler only translates outcomes into DIMSE status codes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.index import Index, InstanceRecord
from dicomnode.storage import check_free_space, instance_path, store_bytes

# Attributes kept in the index so queries never have to open files.
QUERY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "StudyDescription", "ReferringPhysicianName",
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate",
    "SeriesTime", "BodyPartExamined", "ProtocolName", "Manufacturer",
    "ManufacturerModelName", "ConvolutionKernel", "MagneticFieldStrength",
    "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
    "ImageType",
)


class RejectedInstance(ValueError):
    """The instance cannot be accepted; the message says why, for the log and the peer."""


@dataclass(frozen=True)
class ReceiveOutcome:
    record: InstanceRecord
    path: Path
    size: int
    action: str  # stored | replaced | duplicate | kept-first
    reopened: bool = False


def _text(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    if isinstance(value, int | float):
        return value
    return str(value)


def parse_header(data: bytes, transfer_syntax: str | None = None,
                 affected_sop_class: str | None = None,
                 affected_sop_instance: str | None = None) -> InstanceRecord:
    """Read the identifying attributes of an encoded instance, checking they agree.

    ``transfer_syntax`` is the negotiated one for network input; files carry their own.
    """
    try:
        ds: Dataset = dcmread(BytesIO(data), stop_before_pixels=True, force=False)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise RejectedInstance(f"cannot parse dataset: {exc}") from None
    if transfer_syntax is None:
        transfer_syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
        if not transfer_syntax:
            raise RejectedInstance("no transfer syntax in the file meta information")
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                           "SeriesInstanceUID") if not str(ds.get(k, "")).strip()]
    if missing:
        raise RejectedInstance(f"missing required attribute(s): {', '.join(missing)}")
    sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    if affected_sop_class and sop_class != affected_sop_class:
        raise RejectedInstance(f"SOPClassUID {sop_class} does not match the request's"
                               f" {affected_sop_class}")
    if affected_sop_instance and sop_uid != affected_sop_instance:
        raise RejectedInstance(f"SOPInstanceUID {sop_uid} does not match the request's"
                               f" {affected_sop_instance}")
    try:
        number = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") is not None else None
    except (TypeError, ValueError):
        number = None
    attrs = {k: _text(ds.get(k)) for k in QUERY_KEYWORDS if ds.get(k) not in (None, "")}
    return InstanceRecord(
        sop_instance_uid=sop_uid, sop_class_uid=sop_class,
        series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID),
        transfer_syntax=transfer_syntax, modality=attrs.get("Modality"),
        instance_number=number, attrs=attrs)


def receive_instance(data: bytes, record: InstanceRecord, *, index: Index, data_dir: Path,
                     root: Path, reserve_bytes: int, duplicate_policy: str,
                     kind: str = "original") -> ReceiveOutcome:
    """Store and index one instance under ``root``; returns only once both are durable."""
    try:
        path = instance_path(root, record.study_uid, record.series_uid, record.sop_instance_uid)
    except ValueError as exc:
        raise RejectedInstance(str(exc)) from None
    existing = index.instance(record.sop_instance_uid)
    old: Path | None = None
    if existing is not None:
        if existing["sha256"] == hashlib.sha256(data).hexdigest():
            return ReceiveOutcome(record, data_dir / existing["path"], len(data), "duplicate")
        if duplicate_policy == "keep-first":
            return ReceiveOutcome(record, data_dir / existing["path"], len(data), "kept-first")
        if existing["path"] != str(path.relative_to(data_dir)):
            old = data_dir / existing["path"]
    check_free_space(root, len(data), reserve_bytes)
    stored = store_bytes(path, data)
    reopened = index.add_instance(record, str(path.relative_to(data_dir)), stored.size,
                                  stored.sha256, kind=kind)
    if old is not None:
        old.unlink(missing_ok=True)  # the instance moved series: no stale second copy
    return ReceiveOutcome(record, path, stored.size,
                          "replaced" if existing is not None else "stored", reopened)
