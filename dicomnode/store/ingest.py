"""Receiving one instance: check and parse its header, store its bytes durably, index it.

Kept apart from the network handler so it can be called (and tested) with plain bytes or
a file; the handler only translates outcomes into DIMSE status codes.

What is taken is decided by one rule, the same as for files read offline
(:mod:`pipelines.structure`): an instance whose bytes parse completely in their transfer
syntax is stored and indexed as received, whatever its conformance; one whose structure
is broken is refused (0xC000) before anything is written, so it never replaces a good
stored copy. Non-conformant UIDs (a component with a leading zero, say) are stored as
they are and noted (:func:`uid_problem`).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID

from dicomnode.net.status import CANNOT_UNDERSTAND, DATASET_MISMATCH
from dicomnode.store.files import check_free_space, instance_path, move_into_place, store_bytes
from dicomnode.store.index import Index, InstanceRecord
from dicomnode.store.query import INDEXED_KEYS
from pipelines.structure import (
    UNDEFINED,
    Layout,
    StructureError,
    expected_pixel_bytes,
    header_values,
    tag_text,
    walk,
    walk_file,
)

_INDEXED_TAGS = tuple((kw, tag_for_keyword(kw)) for kw in INDEXED_KEYS)
# Without these an instance cannot be filed (each is also one of INDEXED_KEYS).
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# What the expected length of native pixel data is computed from
PIXEL_DESCRIPTION = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames")
# The elements a header parse decodes: the index's keys, the character set their text is
# in, and what the pixel data's length is checked against
HEADER_TAGS = frozenset([tag for _, tag in _INDEXED_TAGS] + [tag_for_keyword(k) for k in (
    "SpecificCharacterSet", "PhotometricInterpretation", *PIXEL_DESCRIPTION)])
PHOTOMETRIC = tag_for_keyword("PhotometricInterpretation")
UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID")
_CONFORMANT_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

_UID_LOCKS = tuple(threading.Lock() for _ in range(64))


class RejectedInstance(ValueError):
    """The instance cannot be accepted; the message says why, for the log and the peer.

    The message is always our own wording (UIDs, tags and lengths at most), never the text
    of a parser exception: those quote raw element bytes, which can be a patient's name.
    ``error`` is the type of the exception that made it unreadable, ``tag`` the element.
    """

    def __init__(self, reason: str, *, status: int = CANNOT_UNDERSTAND,
                 error: str | None = None, tag: str | None = None) -> None:
        super().__init__(reason)
        self.status, self.error, self.tag = status, error, tag


@dataclass(frozen=True)
class ReceiveOutcome:
    record: InstanceRecord
    path: Path
    size: int
    action: str  # stored | replaced | duplicate | kept-first
    reopened: bool = False


def _indexed(values: dict[int, Any]) -> dict[str, str | int | float]:
    """The INDEXED_KEYS the instance has, as text or numbers; a :class:`RejectedInstance`
    naming the tag of one that cannot be read (a malformed value: wrong length, undecodable
    text)."""
    attrs = {}
    for keyword, tag in _INDEXED_TAGS:
        value = values.get(tag)
        if isinstance(value, Exception):
            raise RejectedInstance(f"cannot read {keyword}", error=type(value).__name__,
                                   tag=tag_text(tag))
        if value not in (None, ""):
            attrs[keyword] = value
    return attrs


def uid_problem(keyword: str, uid: str) -> str | None:
    """Why ``uid`` is not a conformant UID (PS3.5 9.1), or None. Such UIDs are common in
    archives and are stored as received; the reason is logged and noted on the series."""
    if len(uid) > 64:
        return f"{keyword} {uid} is longer than 64 characters"
    if _CONFORMANT_UID.fullmatch(uid):
        return None
    if re.fullmatch(r"[0-9.]+", uid):
        parts = uid.split(".")
        if any(p == "" for p in parts):
            return f"{keyword} {uid} has an empty component"
        return f"{keyword} {uid} has a component with a leading zero"
    return f"{keyword} {uid} has characters other than digits and dots"


def _pixel_description(values: dict[int, Any]) -> dict[str, Any]:
    """Rows, Columns, BitsAllocated, SamplesPerPixel and NumberOfFrames (1 when absent) as
    integers; a :class:`RejectedInstance` naming the first that is not one."""
    out = {}
    for keyword in PIXEL_DESCRIPTION:
        tag = tag_for_keyword(keyword)
        value = values.get(tag, 1 if keyword == "NumberOfFrames" else None)
        try:
            out[keyword] = int(value)
        except (TypeError, ValueError) as exc:
            failure = value if isinstance(value, Exception) else exc
            raise RejectedInstance(f"PixelData with an unreadable {keyword}",
                                   error=type(failure).__name__, tag=tag_text(tag)) from None
    return out


def _check_pixel_data(values: dict[int, Any], transfer_syntax: str,
                      length: int | None) -> None:
    """Reject pixel data that cannot be decoded as its header describes it, before it can
    replace a good stored copy: native data shorter than Rows x Columns x samples x bits x
    frames, or encapsulated data that is not encapsulated (a defined length)."""
    if length is None:
        return
    if UID(transfer_syntax).is_encapsulated:
        if length != UNDEFINED:
            raise RejectedInstance(f"PixelData has a defined length ({length} bytes) but"
                                   f" transfer syntax {transfer_syntax} needs encapsulated"
                                   " fragments")
        return
    if length == UNDEFINED:
        raise RejectedInstance(f"PixelData has an undefined length in the native transfer"
                               f" syntax {transfer_syntax}")
    d = _pixel_description(values)
    expected = expected_pixel_bytes(d["Rows"], d["Columns"], d["SamplesPerPixel"],
                                    d["BitsAllocated"], d["NumberOfFrames"],
                                    str(values.get(PHOTOMETRIC, "")))
    if length < expected:
        raise RejectedInstance(f"PixelData has {length} bytes; Rows, Columns, SamplesPerPixel,"
                               f" BitsAllocated and NumberOfFrames need {expected}")


def layout_of(source: Any, transfer_syntax: str | None = None) -> Layout:
    """The walked structure of an encoded instance (bytes, or a Path read through a
    mapping); a :class:`RejectedInstance` when it is broken."""
    try:
        if isinstance(source, Path):
            return walk_file(source, transfer_syntax, HEADER_TAGS)
        return walk(source, transfer_syntax, HEADER_TAGS)
    except StructureError as exc:
        raise RejectedInstance(str(exc), error="StructureError", tag=exc.tag) from None


def parse_header(source: Any, transfer_syntax: str | None = None,
                 affected_sop_class: str | None = None,
                 affected_sop_instance: str | None = None) -> InstanceRecord:
    """Check an encoded instance (bytes, or a Part 10 file's Path) and read the attributes
    the index keeps, checking the UIDs agree with the request's.

    ``transfer_syntax`` is the negotiated one for network input; files carry their own.
    Whatever is wrong with the bytes, the outcome is a record or a RejectedInstance; no
    value is read but the index's keys, and the pixel data's length is checked against
    the header without decoding it.
    """
    layout = layout_of(source, transfer_syntax)
    values = header_values(layout)
    attrs = _indexed(values)
    missing = [k for k in REQUIRED if not str(attrs.get(k, "")).strip()]
    if missing:
        raise RejectedInstance(f"missing required attribute(s): {', '.join(missing)}")
    sop_class, sop_uid = str(attrs["SOPClassUID"]), str(attrs["SOPInstanceUID"])
    if affected_sop_class and sop_class != affected_sop_class:
        raise RejectedInstance(f"SOPClassUID {sop_class} does not match the request's"
                               f" {affected_sop_class}", status=DATASET_MISMATCH)
    if affected_sop_instance and sop_uid != affected_sop_instance:
        raise RejectedInstance(f"SOPInstanceUID {sop_uid} does not match the request's"
                               f" {affected_sop_instance}", status=DATASET_MISMATCH)
    pixels = layout.pixel_data
    _check_pixel_data(values, layout.transfer_syntax, pixels.length if pixels else None)
    try:
        number = int(attrs["InstanceNumber"]) if "InstanceNumber" in attrs else None
    except (TypeError, ValueError):
        number = None
    notes = tuple(problem for kw in UIDS if (problem := uid_problem(kw, str(attrs[kw]))))
    return InstanceRecord(
        sop_instance_uid=sop_uid, sop_class_uid=sop_class,
        series_uid=str(attrs["SeriesInstanceUID"]), study_uid=str(attrs["StudyInstanceUID"]),
        transfer_syntax=layout.transfer_syntax, modality=attrs.get("Modality"),
        instance_number=number, attrs=attrs, notes=notes)


def _uid_lock(sop_instance_uid: str) -> threading.Lock:
    """Stores of one SOP Instance UID run one at a time: two associations may send it at
    once, and each must read, write, index and clean up against a settled index row."""
    return _UID_LOCKS[hash(sop_instance_uid) % len(_UID_LOCKS)]


def receive_instance(data: bytes, record: InstanceRecord, *, index: Index, data_dir: Path,
                     root: Path, reserve_bytes: int, duplicate_policy: str,
                     kind: str = "original") -> ReceiveOutcome:
    """Store and index one parsed instance under ``root``; returns only once both are
    durable (see :func:`_file`)."""
    sha256 = hashlib.sha256(data).hexdigest()
    return _file(record, sha256, len(data), lambda path: store_bytes(path, data, sha256),
                 index=index, data_dir=data_dir, root=root, reserve_bytes=reserve_bytes,
                 needed=len(data), duplicate_policy=duplicate_policy, kind=kind)


def receive_file(source: Path, *, index: Index, data_dir: Path, root: Path,
                 reserve_bytes: int, duplicate_policy: str, transfer_syntax: str,
                 affected_sop_class: str, affected_sop_instance: str,
                 written: tuple[str, int] | None = None) -> ReceiveOutcome:
    """Parse, store and index a data set received into the file ``source`` (a Part 10
    file on ``root``'s file system, as pynetdicom writes it), which is moved into place;
    ``written`` is its SHA-256 and size where they were taken as it was written.

    Only the header is read into memory, so an instance of any size costs the same memory.
    ``source`` is already on the disk, so the free-space check asks for nothing more.
    """
    record = parse_header(source, transfer_syntax, affected_sop_class, affected_sop_instance)
    if written is None:
        with source.open("rb") as fh:
            written = hashlib.file_digest(fh, "sha256").hexdigest(), fh.tell()
    sha256, size = written
    return _file(record, sha256, size, lambda path: move_into_place(source, path),
                 index=index, data_dir=data_dir, root=root, reserve_bytes=reserve_bytes,
                 needed=0, duplicate_policy=duplicate_policy, kind="original")


def _file(record: InstanceRecord, sha256: str, size: int, place: Callable[[Path], object], *,
          index: Index, data_dir: Path, root: Path, reserve_bytes: int, needed: int,
          duplicate_policy: str, kind: str) -> ReceiveOutcome:
    """File and index an instance whose bytes ``place(path)`` makes durable at ``path``
    (``needed`` more bytes of disk, checked against the reserve; a duplicate needs none).

    The index always describes a whole file on disk: a replacement is written under a
    name the indexed copy does not have, indexed, and only then is the old copy removed.
    A crash in between leaves an unindexed file whose UID is indexed, which start-up
    reconciliation removes (see :func:`dicomnode.store.recovery.reconcile`).
    """
    uid = record.sop_instance_uid
    path = instance_path(root, record.study_uid, record.series_uid, uid)
    with _uid_lock(uid):
        existing = index.instance(uid)
        old = existing["path"] if existing is not None else None
        if existing is not None:
            if existing["sha256"] == sha256:
                return ReceiveOutcome(record, data_dir / old, size, "duplicate")
            if duplicate_policy == "keep-first":
                return ReceiveOutcome(record, data_dir / old, size, "kept-first")
            if old == str(path.relative_to(data_dir)):
                path = path.with_name(f"{path.stem}-{sha256[:16]}.dcm")
        check_free_space(root, needed, reserve_bytes)
        place(path)
        rel = str(path.relative_to(data_dir))
        reopened = index.add_instance(record, rel, size, sha256, kind=kind)
        if old is not None and old != rel:
            (data_dir / old).unlink(missing_ok=True)  # replaced: no stale second copy
    return ReceiveOutcome(record, path, size,
                          "replaced" if existing is not None else "stored", reopened)
