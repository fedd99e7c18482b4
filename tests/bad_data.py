"""Data sets as senders get them wrong: broken ones the node must refuse, and the quirks of
real scanners and converters it must take. Each case is a Part 10 file's bytes (file meta
and data set), made from a small explicit VR little endian CT instance by editing bytes,
so nothing on the way (pydicom's writer) can repair it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
            b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
REQUIRED = {(0x0008, 0x0016), (0x0008, 0x0018), (0x0020, 0x000D), (0x0020, 0x000E)}


@dataclass(frozen=True)
class Case:
    """One data set to send: ``accepted`` is what the node must answer (Success, else
    0xC000 Cannot Understand); ``syntax`` the transfer syntax its context is negotiated in."""

    name: str
    data: bytes
    accepted: bool
    syntax: str = ExplicitVRLittleEndian

    def write(self, folder: Path) -> Path:
        path = folder / f"{self.name}.dcm"
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class Element:
    group: int
    elem: int
    vr: bytes
    start: int      # of the header, in the data set
    header: int     # header length
    length: int

    @property
    def end(self) -> int:
        return self.start + self.header + self.length


def split(path: Path) -> tuple[bytes, bytes]:
    """A Part 10 file's file meta (preamble included) and data set bytes."""
    raw = path.read_bytes()
    meta_length = dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
    cut = 132 + 12 + meta_length
    return raw[:cut], raw[cut:]


def elements(dataset: bytes) -> list[Element]:
    """The top-level elements of an explicit VR little endian data set of defined lengths."""
    out, pos = [], 0
    while pos < len(dataset):
        group, elem, vr = struct.unpack_from("<HH2s", dataset, pos)
        if vr in LONG_VRS:
            header, length = 12, struct.unpack_from("<L", dataset, pos + 8)[0]
        else:
            header, length = 8, struct.unpack_from("<H", dataset, pos + 6)[0]
        out.append(Element(group, elem, vr, pos, header, length))
        pos += header + length
    return out


def explicit(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` overrides the true one."""
    length = len(value) if length is None else length
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", group, elem, vr, 0, length) + value
    return struct.pack("<HH2sH", group, elem, vr, length) + value


def implicit(group: int, elem: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HHL", group, elem, len(value) if length is None else length) + value


def _insert(dataset: bytes, at: tuple[int, int], extra: bytes) -> bytes:
    """``extra`` placed before the first element at or after tag ``at``."""
    for e in elements(dataset):
        if (e.group, e.elem) >= at:
            return dataset[:e.start] + extra + dataset[e.start:]
    return dataset + extra


def _private(at_group: int = 0x0029) -> bytes:
    return explicit(at_group, 0x0010, b"LO", b"FUZZ TEST ")


def truncations(meta: bytes, dataset: bytes) -> Iterator[tuple[str, bytes, bool]]:
    """The data set cut at every structural boundary and inside each part of every element:
    a cut between elements leaves a whole (shorter) data set, accepted when it still has
    the UIDs to file it; any other cut is refused."""
    seen: set[tuple[int, int]] = set()
    for e in elements(dataset):
        seen.add((e.group, e.elem))
        tag = f"{e.group:04X}{e.elem:04X}"
        yield f"cut-after-{tag}", meta + dataset[:e.end], REQUIRED <= seen
        for where, offset in (("tag", 3), ("vr", 5), ("length", e.header - 1),
                              ("value", e.header + e.length // 2)):
            if where == "value" and e.length < 2:
                continue
            yield f"cut-in-{where}-of-{tag}", meta + dataset[:e.start + offset], False


def broken(meta: bytes, dataset: bytes) -> Iterator[tuple[str, bytes]]:
    """Data sets whose structure is broken in one way each."""
    elems = elements(dataset)
    pixel = next(e for e in elems if (e.group, e.elem) == (0x7FE0, 0x0010))
    before_pixels, pixel_header = dataset[:pixel.start], dataset[pixel.start:pixel.start + 12]
    yield "private-un-runs-past-end", meta + _insert(
        dataset, (0x0029, 0x0010), _private() + explicit(0x0029, 0x1001, b"UN", bytes(64),
                                                          length=0x7FFFFFFF))
    yield "ob-length-fffffff0-before-pixels", meta + before_pixels + explicit(
        0x0029, 0x1002, b"OB", b"\x00" * 16, length=0xFFFFFFF0) + dataset[pixel.start:]
    yield "pixel-data-declares-2gib-sends-512", meta + before_pixels + struct.pack(
        "<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 0x7FFFFFF0) + bytes(512)
    yield "ends-three-bytes-into-pixel-tag", meta + before_pixels + pixel_header[:3]
    yield "garbage-vr", meta + _insert(dataset, (0x0008, 0x0070),
                                       struct.pack("<HH2sH", 0x0008, 0x0070, b"\x01\x02", 4)
                                       + b"ACME")
    yield "undefined-length-us", meta + _insert(
        dataset, (0x0028, 0x0010), struct.pack("<HH2sH", 0x0028, 0x0008, b"US", 0xFFFF)
        + struct.pack("<HHL", 0x0028, 0x0009, UNDEFINED))
    yield "item-tag-at-top-level", meta + _insert(dataset, (0x0010, 0x0000),
                                                  struct.pack("<HHL", *ITEM, 0))
    yield "sequence-delimiter-at-top-level", meta + _insert(dataset, (0x0010, 0x0000),
                                                            struct.pack("<HHL", *SEQUENCE_END, 0))
    yield "sequence-item-runs-past-sequence", meta + _insert(
        dataset, (0x0008, 0x1140), explicit(0x0008, 0x1140, b"SQ", struct.pack(
            "<HHL", *ITEM, 64) + explicit(0x0008, 0x1150, b"UI", b"1.2\x00"), length=12))
    yield "undefined-sequence-never-ends", meta + dataset[:pixel.start] + explicit(
        0x0029, 0x0010, b"LO", b"FUZZ TEST ") + struct.pack("<HH2sHL", 0x0029, 0x1010, b"SQ",
                                                             0, UNDEFINED) + struct.pack(
        "<HHL", *ITEM, UNDEFINED) + explicit(0x0008, 0x0100, b"SH", b"CODE")
    yield "fragments-never-end", meta + before_pixels + struct.pack(
        "<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, UNDEFINED) + struct.pack("<HHL", *ITEM, 0)
    yield "nested-40-deep", meta + _insert(dataset, (0x0029, 0x0010), _private()
                                           + _nested(40))
    yield "empty-data-set", meta


def _nested(depth: int) -> bytes:
    """A private sequence nested ``depth`` levels, undefined lengths throughout."""
    inner = explicit(0x0008, 0x0100, b"SH", b"CODE")
    for _ in range(depth):
        inner = (struct.pack("<HH2sHL", 0x0029, 0x1010, b"SQ", 0, UNDEFINED)
                 + struct.pack("<HHL", *ITEM, UNDEFINED) + inner
                 + struct.pack("<HHL", *ITEM_END, 0) + struct.pack("<HHL", *SEQUENCE_END, 0))
    return inner


def wrong_syntax(meta: bytes, dataset: bytes, implicit_dataset: bytes) -> Iterator[Case]:
    """Bytes in one VR encoding sent on a context negotiated in the other."""
    yield Case("explicit-bytes-implicit-context", meta.replace(
        ExplicitVRLittleEndian.encode(), ImplicitVRLittleEndian.encode().ljust(
            len(ExplicitVRLittleEndian), b"\x00")) + dataset, False, ImplicitVRLittleEndian)
    yield Case("implicit-bytes-explicit-context", meta + implicit_dataset, False)


def quirks(meta: bytes, dataset: bytes) -> Iterator[tuple[str, bytes]]:
    """What real scanners and converters send and the node must take."""
    elems = elements(dataset)
    un_tags = {(0x0008, 0x0016), (0x0008, 0x0018), (0x0008, 0x0060), (0x0020, 0x000D),
               (0x0020, 0x000E), (0x0028, 0x0010)}
    un = b"".join(explicit(e.group, e.elem, b"UN", dataset[e.start + e.header:e.end])
                  if (e.group, e.elem) in un_tags else dataset[e.start:e.end] for e in elems)
    yield "un-encoded-standard-attributes", meta + un
    yield "odd-length-value", meta + _insert(dataset, (0x0008, 0x1010),
                                             explicit(0x0008, 0x1010, b"SH", b"CT1"))
    yield "private-sequence-of-undefined-length", meta + _insert(
        dataset, (0x0029, 0x0010), _private() + struct.pack("<HH2sHL", 0x0029, 0x1010, b"SQ",
                                                            0, UNDEFINED)
        + struct.pack("<HHL", *ITEM, UNDEFINED) + explicit(0x0008, 0x0100, b"SH", b"CODE")
        + struct.pack("<HHL", *ITEM_END, 0) + struct.pack("<HHL", *SEQUENCE_END, 0))
    yield "un-of-undefined-length-holding-implicit-items", meta + _insert(
        dataset, (0x0029, 0x0010), _private() + struct.pack("<HH2sHL", 0x0029, 0x1020, b"UN",
                                                            0, UNDEFINED)
        + struct.pack("<HHL", *ITEM, UNDEFINED) + implicit(0x0008, 0x0100, b"CODE")
        + struct.pack("<HHL", *ITEM_END, 0) + struct.pack("<HHL", *SEQUENCE_END, 0))
    yield "nested-8-deep", meta + _insert(dataset, (0x0029, 0x0010), _private() + _nested(8))


def implicit_copy(path: Path, out: Path) -> Path:
    """``path`` re-encoded in implicit VR little endian."""
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    return out


def with_uids(ds: Dataset, path: Path, **uids: str) -> Path:
    """``ds`` written to ``path`` with UIDs as given, conformant or not (a scanner's
    software of 2019 wrote components with leading zeros)."""
    for keyword, value in uids.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    with config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)
    return path
