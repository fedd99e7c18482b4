"""The encoded structure of a DICOM file, walked without reading its values.

One acceptance rule for every way an instance reaches the node (C-STORE, a folder for
``dicomnode harmonise``): an instance is taken when its bytes parse *completely* in their
transfer syntax, whatever else is non-conformant about it (odd UIDs, odd-length values,
private tags, UN-encoded standard attributes); it is refused when its structure is
broken. Broken means: an element whose value runs past the end of the data set (or of
the item or sequence holding it), a data set that ends inside an element's header, an
item or delimiter where none can be, an undefined length on an element that cannot have
one, or explicit VR bytes that are not a VR (what implicit VR bytes read as explicit look
like, and vice versa).

The walk reads element headers only (tag, VR, length) and jumps over values, recursing
into sequences and items, so it costs the same whatever the size of the pixel data. It
works on any buffer (``bytes``, ``mmap``), so a file is checked without being read into
memory. It returns where the asked-for top-level elements are, so the few attributes an
index needs can be decoded by pydicom from their bytes alone (:func:`header_dataset`).
"""

from __future__ import annotations

import functools
import mmap
import re
import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
TRANSFER_SYNTAX_UID = 0x00020010
# explicit VRs with a 4-byte length after two reserved bytes (PS3.5 7.1.2)
LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"))
MAX_DEPTH = 32            # sequences nested deeper than this are refused (a recursion bomb)
MAX_INFLATED = 2**28      # a deflated data set is inflated in memory: at most 256 MiB


class StructureError(ValueError):
    """The bytes do not parse as a data set: ``reason`` in our words (tags, lengths and
    offsets, never element values), ``tag`` the element where it went wrong."""

    def __init__(self, reason: str, tag: int | None = None) -> None:
        super().__init__(reason)
        self.tag = None if tag is None else tag_text(tag)


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class Element:
    """Where one element is: its tag, VR (None in implicit VR), length and value offset."""

    tag: int
    vr: str | None
    length: int
    offset: int


@dataclass
class Layout:
    """A walked data set: its transfer syntax, the file meta elements, and the top-level
    elements that were asked for (pixel data always, when present)."""

    transfer_syntax: str
    implicit: bool
    little: bool
    buffer: Any                      # what the offsets point into (the inflated data set
    start: int                       # for a deflated one), and where the data set starts
    meta: dict[int, Element] = field(default_factory=dict)
    elements: dict[int, Element] = field(default_factory=dict)

    @property
    def pixel_data(self) -> Element | None:
        return self.elements.get(PIXEL_DATA)


@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


class _Walker:
    def __init__(self, buf: Any, little: bool, want: Collection[int] | None) -> None:
        self.buf, self.want = buf, want
        order = "<" if little else ">"
        self.tag_len = struct.Struct(order + "HHL")  # tag + 4-byte length (implicit, items)
        self.short = struct.Struct(order + "HH2sH")  # tag + VR + 2-byte length
        self.long_len = struct.Struct(order + "L")
        self.found: dict[int, Element] = {}

    def dataset(self, pos: int, end: int | None, depth: int, implicit: bool) -> int:
        """Walk a data set from ``pos`` to ``end`` (None: up to an item delimiter); the
        position after it."""
        if depth > MAX_DEPTH:
            raise StructureError(f"sequences nested deeper than {MAX_DEPTH} levels")
        buf, limit = self.buf, len(self.buf) if end is None else end
        while True:
            if pos == limit:
                if end is None:
                    raise StructureError("the data set ends inside an item of undefined"
                                         " length")
                return pos
            if pos + 8 > limit:
                raise StructureError(f"the data set ends {limit - pos} byte(s) into an"
                                     " element's header")
            group, elem, length = self.tag_len.unpack_from(buf, pos)
            tag = group << 16 | elem
            if group == 0xFFFE:
                if tag == ITEM_END and end is None:
                    return pos + 8
                raise StructureError(f"{tag_text(tag)} where a data element was expected",
                                     tag)
            vr: str | None = None
            if implicit:
                header = 8
            else:
                _, _, raw_vr, short_length = self.short.unpack_from(buf, pos)
                if not (65 <= raw_vr[0] <= 90 and 65 <= raw_vr[1] <= 90):
                    raise StructureError(f"{tag_text(tag)} has no valid explicit VR", tag)
                vr = raw_vr.decode("ascii")
                if raw_vr in LONG_VRS:
                    if pos + 12 > limit:
                        raise StructureError(f"the data set ends inside the header of"
                                             f" {tag_text(tag)}", tag)
                    length, header = self.long_len.unpack_from(buf, pos + 8)[0], 12
                else:
                    length, header = short_length, 8
            start = pos + header
            sequence = vr == "SQ" or (implicit and _dictionary_vr(tag) == "SQ")
            if length == UNDEFINED:
                if tag == PIXEL_DATA:
                    pos = self.fragments(start, tag)
                elif sequence or implicit or vr == "UN":
                    # UN of undefined length holds items in implicit VR (PS3.5 6.2.2)
                    pos = self.sequence(start, None, depth, implicit or vr == "UN", tag)
                else:
                    raise StructureError(f"{tag_text(tag)} ({vr}) has an undefined length",
                                         tag)
            else:
                pos = start + length
                if pos > limit:
                    raise StructureError(f"{tag_text(tag)} declares {length} bytes but only"
                                         f" {limit - start} remain", tag)
                if sequence:
                    self.sequence(start, pos, depth, implicit, tag)
            if depth == 0 and (self.want is None or tag in self.want):
                self.found[tag] = Element(tag, vr, length, start)

    def sequence(self, pos: int, end: int | None, depth: int, implicit: bool,
                 owner: int) -> int:
        """Walk a sequence's items from ``pos`` to ``end`` (None: up to its delimiter)."""
        buf, limit = self.buf, len(self.buf) if end is None else end
        while True:
            if pos == limit and end is not None:
                return pos
            if pos + 8 > limit:
                raise StructureError(f"the data set ends inside the sequence"
                                     f" {tag_text(owner)}", owner)
            group, elem, length = self.tag_len.unpack_from(buf, pos)
            tag = group << 16 | elem
            if tag == SEQUENCE_END and end is None:
                return pos + 8
            if tag != ITEM:
                raise StructureError(f"{tag_text(tag)} inside the sequence {tag_text(owner)}"
                                     " where an item was expected", owner)
            if length == UNDEFINED:
                pos = self.dataset(pos + 8, None, depth + 1, implicit)
            else:
                item_end = pos + 8 + length
                if item_end > limit:
                    raise StructureError(f"an item of {tag_text(owner)} declares {length}"
                                         f" bytes but only {limit - pos - 8} remain", owner)
                self.dataset(pos + 8, item_end, depth + 1, implicit)
                pos = item_end

    def fragments(self, pos: int, owner: int) -> int:
        """Walk encapsulated pixel data: items of defined length up to the delimiter."""
        buf, limit = self.buf, len(self.buf)
        while True:
            if pos + 8 > limit:
                raise StructureError(f"the data set ends inside the encapsulated"
                                     f" {tag_text(owner)}", owner)
            group, elem, length = self.tag_len.unpack_from(buf, pos)
            tag = group << 16 | elem
            if tag == SEQUENCE_END:
                return pos + 8
            if tag != ITEM or length == UNDEFINED:
                raise StructureError(f"{tag_text(tag)} in encapsulated {tag_text(owner)}"
                                     " where a fragment was expected", owner)
            pos += 8 + length
            if pos > limit:
                raise StructureError(f"a fragment of {tag_text(owner)} declares {length}"
                                     f" bytes but only {limit - (pos - length)} remain",
                                     owner)


_META_SHORT, _META_LONG = struct.Struct("<HH2sH"), struct.Struct("<L")


def _meta(buf: Any) -> tuple[dict[int, Element], int]:
    """The file meta elements (explicit VR little endian, group 0002) and where the data
    set starts: after a 128-byte preamble and ``DICM``, or at 0 without them."""
    pos = 132 if len(buf) >= 132 and buf[128:132] == b"DICM" else 0
    meta = {}
    while pos + 8 <= len(buf):
        group, elem, raw_vr, length = _META_SHORT.unpack_from(buf, pos)
        if group != 0x0002:
            break
        tag, header = group << 16 | elem, 8
        if not (65 <= raw_vr[0] <= 90 and 65 <= raw_vr[1] <= 90):
            raise StructureError(f"file meta element {tag_text(tag)} has no valid VR", tag)
        if raw_vr in LONG_VRS:
            if pos + 12 > len(buf):
                raise StructureError("the file meta information ends inside an element",
                                     tag)
            length, header = _META_LONG.unpack_from(buf, pos + 8)[0], 12
        if pos + header + length > len(buf):
            raise StructureError(f"file meta element {tag_text(tag)} runs past the end", tag)
        meta[tag] = Element(tag, raw_vr.decode("ascii"), length, pos + header)
        pos += header + length
    return meta, pos


def _text(buf: Any, element: Element) -> str:
    raw = bytes(buf[element.offset:element.offset + element.length])
    return raw.decode("ascii", "replace").strip(" \x00")


def walk(buf: Any, transfer_syntax: str | None = None,
         want: Collection[int] | None = ()) -> Layout:
    """Check that ``buf`` holds a whole data set (with or without file meta information)
    and find its top-level elements in ``want`` (pixel data is always found; None: every
    top-level element).

    ``transfer_syntax`` is the one the data set is encoded in where it is known apart from
    the bytes (a C-STORE's negotiated one); otherwise the file meta's, and implicit VR
    little endian without one. Raises :class:`StructureError`.
    """
    meta, start = _meta(buf)
    declared = transfer_syntax is not None
    if not declared:
        ts = meta.get(TRANSFER_SYNTAX_UID)
        transfer_syntax = _text(buf, ts) if ts is not None else _guess(buf, start)
    uid = UID(transfer_syntax)
    known = uid.is_transfer_syntax
    implicit = uid.is_implicit_VR if known else False
    little = uid.is_little_endian if known else True
    data, offset = buf, start
    if known and uid.is_deflated:
        data, offset = _inflate(buf, start), 0
    elif not declared and len(data) >= offset + 6:
        # a file whose meta names the wrong VR encoding: read it as pydicom does, by
        # whether its first element has a VR (a C-STORE's negotiated syntax is binding)
        implicit = not _has_vr(data, offset)
    walker = _Walker(data, little, None if want is None else frozenset(want) | {PIXEL_DATA})
    walker.dataset(offset, len(data), 0, implicit)
    return Layout(str(uid), implicit, little, data, offset, meta, walker.found)


def _has_vr(buf: Any, start: int) -> bool:
    """Whether the element at ``start`` carries an explicit VR."""
    vr = bytes(buf[start + 4:start + 6])
    return len(vr) == 2 and vr.isalpha() and vr.isupper()


def _guess(buf: Any, start: int) -> str:
    """The syntax of a data set without file meta information, as pydicom reads such
    files: explicit VR where its first element has a VR, big endian where its first group
    reads small that way only."""
    group_le, group_be = (int.from_bytes(buf[start:start + 2], order) for order in
                          ("little", "big"))
    if _has_vr(buf, start):
        return ExplicitVRBigEndian if group_le > 0xFF >= group_be else ExplicitVRLittleEndian
    return ImplicitVRLittleEndian


def _inflate(buf: Any, start: int) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(bytes(buf[start:]), MAX_INFLATED)
    except zlib.error:
        raise StructureError("the deflated data set does not inflate") from None
    if inflater.unconsumed_tail:
        raise StructureError(f"the deflated data set inflates beyond {MAX_INFLATED >> 20}"
                             " MiB")
    return data


# Reading values: the common cases decoded here, exactly as pydicom decodes them (checked by
# tests/unit/test_structure.py against pydicom on real and generated files), the rest by
# pydicom. A header parse decodes a few dozen values per instance, and pydicom's general
# conversion costs most of it.
_STRINGS = frozenset(("AS", "CS", "DA", "DT", "TM", "UI"))   # rstrip " \0", split on "\"
_TEXTS = frozenset(("LO", "SH", "UC"))                       # split on "\", rstrip each
_SINGLE_TEXTS = frozenset(("LT", "ST", "UT"))                 # one value, rstrip
_INTEGERS = {"US": "H", "SS": "h", "UL": "L", "SL": "l"}
_PLAIN_ASCII = re.compile(rb"[\x20-\x7e\x00]*")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


class _Slow(Exception):
    """This value is pydicom's to decode."""


def _direct(vr: str, raw: bytes, little: bool) -> Any:
    """The value of one element as the index keeps it (text, or a single number),
    decoded from plain ASCII bytes; :class:`_Slow` for anything else."""
    if vr in _INTEGERS:
        code = _INTEGERS[vr]
        if len(raw) != struct.calcsize("<" + code):
            raise _Slow
        return struct.unpack(("<" if little else ">") + code, raw)[0]
    if not _PLAIN_ASCII.fullmatch(raw):
        raise _Slow  # another character set's bytes, or escape sequences
    text = raw.decode("ascii")
    if vr in _STRINGS:
        values = text.rstrip(" \x00").split("\\")
    elif vr == "PN":
        values = text.rstrip("\x00 ").split("\\")
    elif vr in _TEXTS:
        values = [v.rstrip("\x00 ") for v in text.split("\\")]
    elif vr in _SINGLE_TEXTS:
        return text.rstrip("\x00 ")
    elif vr == "AE":
        values = [v.strip() for v in text.split("\\")]
    elif vr in ("IS", "DS"):
        number = text.strip(" \x00")
        if "\\" in number:
            raise _Slow
        if not number:
            return None
        if vr == "IS" and _INTEGER.fullmatch(number):
            return int(number)
        if vr == "DS" and _DECIMAL.fullmatch(number):
            return float(number)
        raise _Slow
    else:
        raise _Slow
    return values[0] if len(values) == 1 else "\\".join(values)


def index_value(value: Any) -> Any:
    """A value pydicom read, as the index keeps it: text (multiple values joined with
    ``\\``) or a number."""
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    if isinstance(value, int | float):
        return value
    return str(value)


def header_values(layout: Layout) -> dict[int, Any]:
    """The found elements' values (pixel data aside) as the index keeps them, decoded
    directly from plain ASCII text and single numbers, by pydicom otherwise (character
    sets, UN of unknown tags, multiple numbers). A value that cannot be read is the
    exception reading it raised, for the caller to report by tag."""
    out: dict[int, Any] = {}
    slow = []
    buf, little = layout.buffer, layout.little
    for tag, e in layout.elements.items():
        if tag == PIXEL_DATA:
            continue
        vr = e.vr if e.vr not in (None, "UN") else _dictionary_vr(tag) or e.vr or "UN"
        if e.vr == "UN" and not little:
            slow.append(tag)  # UN holds little endian values whatever the syntax
            continue
        try:
            out[tag] = _direct(vr, bytes(buf[e.offset:e.offset + e.length]), little)
        except _Slow:
            slow.append(tag)
    if slow:
        ds = header_dataset(layout)
        for tag in slow:
            try:
                out[tag] = index_value(ds[tag].value)
            except Exception as exc:  # any converter's failure, by type
                out[tag] = exc
    return out


def expected_pixel_bytes(rows: int, columns: int, samples: int, bits: int, frames: int,
                         photometric: str) -> int:
    """The length native pixel data needs (pydicom's ``get_expected_length``)."""
    length = rows * columns * samples * (frames or 1)
    length = length // 8 + (length % 8 > 0) if bits == 1 else length * (bits // 8)
    return length // 3 * 2 if photometric == "YBR_FULL_422" else length


def header_dataset(layout: Layout) -> Dataset:
    """The found elements (not pixel data) as a pydicom data set, decoded by pydicom from
    their bytes alone: their character set applies, and UN-encoded standard attributes
    are read by their dictionary VR."""
    implicit, little = layout.implicit, layout.little
    buf = layout.buffer
    raw = {tag: RawDataElement(Tag(tag), e.vr, e.length, bytes(buf[e.offset:e.offset + e.length]),
                               e.offset, implicit, little, True, False)
           for tag, e in layout.elements.items() if tag != PIXEL_DATA}
    ds = Dataset(raw)
    ds.set_original_encoding(implicit, little)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(layout.transfer_syntax)
    return ds


def walk_file(path: str | Path, transfer_syntax: str | None = None,
              want: Collection[int] = ()) -> Layout:
    """:func:`walk` over a file, mapped rather than read (an empty file is refused).
    Offsets in the result point into the mapping, which lives as long as the layout."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise StructureError("the file is empty")
        view = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return walk(view, transfer_syntax, want)

