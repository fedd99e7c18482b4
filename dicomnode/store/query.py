"""Query/Retrieve matching (PS3.4 C.2.2.2) as pure functions over plain records.

A *record* is a dict of DICOM keyword -> value (str, int or float) describing one entity
at one level: a patient, a study, a series or an image, carrying its own attributes and
those of the levels above it. :func:`aggregate` builds patient, study and series records
(with the computed ``NumberOf...Related...`` and ``ModalitiesInStudy`` keys) from one
representative record per series; :func:`match` applies an identifier's keys.

Matching supported: universal (empty key), single value, wildcards ``*`` and ``?`` (for
the string VRs the standard allows), UID lists (``\\``-separated), and ranges
``a-b`` / ``-b`` / ``a-`` for DA, TM and DT. Person names match case-insensitively.
Multi-valued attributes match when any of their values does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from dicomnode.net.status import DATASET_MISMATCH

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
              "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
LEVEL_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"),
    "STUDY": ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
              "StudyDescription", "ReferringPhysicianName", "PatientAge", "ModalitiesInStudy",
              "SOPClassesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"),
    # the acquisition tags routes match on are series keys too: a site can find every
    # series of a kernel, field strength or TR/TE
    "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "SeriesDate", "SeriesTime", "BodyPartExamined", "ProtocolName", "Manufacturer",
               "ManufacturerModelName", "InstitutionName", "StationName",
               "FrameOfReferenceUID", "ConvolutionKernel", "KVP", "SliceThickness",
               "MagneticFieldStrength", "ScanningSequence", "SequenceName", "RepetitionTime",
               "EchoTime", "InversionTime", "FlipAngle", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "AcquisitionNumber",
              "ContentDate", "ContentTime", "SliceLocation", "Rows", "Columns",
              "NumberOfFrames", "ImageType"),
}
# computed from the index when answering, not read from instances
COMPUTED_KEYS = frozenset((
    "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances", "ModalitiesInStudy", "SOPClassesInStudy",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances"))
# kept in the index (as JSON per instance) so queries never have to open files
INDEXED_KEYS = tuple(kw for kws in LEVEL_KEYS.values() for kw in kws
                     if kw not in COMPUTED_KEYS)
KEY_LEVEL = {kw: level for level, kws in LEVEL_KEYS.items() for kw in kws}
WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
RANGE_VRS = {"DA", "TM", "DT"}
NUMERIC_VRS = {"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD"}
SKIP_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet"}
# answered, never matched: where the entity can be retrieved from, and how soon (everything
# indexed is on the node's disk); the node does no time zone adjustment, so the offset is
# returned empty
ANSWERED_KEYS = {"RetrieveAETitle": None, "InstanceAvailability": "ONLINE",
                 "TimezoneOffsetFromUTC": None}


class QueryError(ValueError):
    """The identifier cannot be processed; ``status`` is the C-FIND/C-MOVE failure code."""

    def __init__(self, message: str, status: int = DATASET_MISMATCH) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Key:
    """One key of an identifier: keyword (or tag string), VR and the value as text."""

    keyword: str
    vr: str
    value: str

    @property
    def universal(self) -> bool:
        return self.value.strip() in ("", "*")


@dataclass(frozen=True)
class Query:
    level: str
    keys: tuple[Key, ...]

    def filters(self) -> list[Key]:
        """Keys that restrict: non-universal, at the query level or above it."""
        top = LEVELS.index(self.level)
        return [k for k in self.keys if not k.universal and k.keyword in KEY_LEVEL
                and LEVELS.index(KEY_LEVEL[k.keyword]) <= top]

    def unique_values(self, keyword: str) -> list[str] | None:
        """The listed values of a unique key used as an exact/UID-list filter, else None."""
        for k in self.filters():
            if k.keyword == keyword and not _has_wildcard(k.value):
                return [v.strip() for v in k.value.split("\\") if v.strip()]
        return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def parse_identifier(identifier: Dataset, model_root: str = "STUDY") -> Query:
    """Read a C-FIND/C-MOVE/C-GET identifier; ``model_root`` is "PATIENT" or "STUDY"."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(f"QueryRetrieveLevel {level!r} is not one of {', '.join(LEVELS)}")
    if model_root == "STUDY" and level == "PATIENT":
        raise QueryError("QueryRetrieveLevel PATIENT is not part of the Study Root model")
    keys = []
    for elem in identifier:
        kw = elem.keyword or keyword_for_tag(elem.tag) or f"{elem.tag:08X}"
        if kw in SKIP_KEYS or elem.tag.group == 0x0002:
            continue
        if elem.VR == "SQ":
            keys.append(Key(kw, "SQ", ""))  # sequence matching: returned empty, not matched
            continue
        keys.append(Key(kw, elem.VR, _text(elem.value)))
    return Query(level, tuple(keys))


def retrieve_selection(query: Query) -> Query:
    """The keys a C-MOVE/C-GET selects by: the unique keys at and above its level.

    PS3.4 C.4.2.2.1: the SCU names what to retrieve by unique keys, one or a list of UIDs
    (a PatientID) at the retrieve level. A missing, empty or wildcard key there would select
    every entity the node holds, so it is refused (0xA900) rather than sending the archive.
    Other keys are not part of a retrieve identifier and are ignored, as dcmtk's and
    Orthanc's SCPs do; missing keys above the level are allowed (relational retrieve). Like
    Orthanc, a STUDY retrieve may name its study by AccessionNumber instead of its UID, as
    some modalities and viewers do.
    """
    levels = LEVELS[:LEVELS.index(query.level) + 1]
    selecting = {UNIQUE_KEY[level] for level in levels}
    own = [UNIQUE_KEY[query.level]]
    if query.level == "STUDY":
        own.append("AccessionNumber")
        selecting.add("AccessionNumber")
    keys = tuple(k for k in query.keys if k.keyword in selecting and k.value.strip())
    if not any(k.keyword in own and not _has_wildcard(k.value) for k in keys):
        raise QueryError(f"a {query.level} level retrieve needs {' or '.join(own)}: one"
                         " value or a backslash-separated list, without wildcards")
    return Query(query.level, keys)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _norm_time(value: str) -> str:
    value = value.replace(":", "").strip()
    whole, _, frac = value.partition(".")
    return whole.ljust(6, "0") + "." + frac.ljust(6, "0")


def _norm(vr: str, value: str) -> str:
    value = value.strip()
    if vr == "DA":
        return value.replace(".", "").replace("-", "")[:8]
    if vr == "TM":
        return _norm_time(value)
    if vr == "DT":
        digits = re.sub(r"[^0-9.]", "", value.split("+")[0].split("-")[0] if value else value)
        date, rest = digits[:8], digits[8:]
        return date.ljust(8, "0") + _norm_time(rest or "0")
    return value


def match_value(vr: str, pattern: str, value: Any) -> bool:
    """Does one stored ``value`` match one identifier key ``pattern`` (non-universal)?"""
    stored = _text(value)
    if stored == "":
        return False
    candidates = [stored, *stored.split("\\")] if "\\" in stored else [stored]
    pattern = pattern.strip()
    if vr == "UI" or "\\" in pattern:
        options = [p.strip() for p in pattern.split("\\") if p.strip()]
        return any(_match_one(vr, p, c.strip()) for p in options for c in candidates)
    return any(_match_one(vr, pattern, c.strip()) for c in candidates)


def _match_one(vr: str, pattern: str, stored: str) -> bool:
    if vr in RANGE_VRS and "-" in pattern and not (vr == "DT" and _looks_like_offset(pattern)):
        low, _, high = pattern.partition("-")
        value = _norm(vr, stored)
        if low.strip() and value < _norm(vr, low):
            return False
        if high.strip():
            top = _norm(vr, high)
            # a range end without seconds/fraction includes that whole unit
            if vr == "TM" and len(high.strip().replace(":", "")) < 6:
                top = _norm_time(high.strip().replace(":", "").ljust(6, "9"))
            if value > top:
                return False
        return True
    if vr in RANGE_VRS:
        return _norm(vr, stored) == _norm(vr, pattern)
    if vr in NUMERIC_VRS:
        try:
            return float(stored) == float(pattern)
        except ValueError:
            return stored == pattern
    if vr in WILDCARD_VRS and _has_wildcard(pattern):
        return _wildcard(pattern, re.IGNORECASE if vr == "PN" else 0).fullmatch(stored) is not None
    if vr == "PN":
        return stored.rstrip("^ ").lower() == pattern.rstrip("^ ").lower()
    return stored == pattern


def _wildcard(pattern: str, flags: int) -> re.Pattern[str]:
    """``*`` and ``?`` are the only wildcards (PS3.4 C.2.2.2.4); every other character,
    ``[`` included, matches itself."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, flags | re.DOTALL)


def _looks_like_offset(pattern: str) -> bool:
    """A DT value with a UTC offset ('...-0500') is not a range."""
    return bool(re.fullmatch(r"\d{8,}[.\d]*-\d{4}", pattern.strip()))


def match(query: Query, record: Mapping[str, Any]) -> bool:
    """Does ``record`` (an entity at ``query.level``) satisfy every filtering key?"""
    for key in query.filters():
        if key.vr == "SQ":
            continue
        if key.keyword == "ModalitiesInStudy":
            mods = _text(record.get("ModalitiesInStudy")).split("\\")
            if not any(match_value("CS", key.value, m) for m in mods if m):
                return False
            continue
        if not match_value(key.vr, key.value, record.get(key.keyword)):
            return False
    return True


def _with(record: Mapping[str, Any], levels: Sequence[str]) -> dict[str, Any]:
    keep = {kw for level in levels for kw in LEVEL_KEYS[level]}
    return {k: v for k, v in record.items() if k in keep}


def aggregate(series: Iterable[Mapping[str, Any]], level: str) -> Iterable[dict[str, Any]]:
    """Entity records at ``level`` from one representative record per series (SERIES:
    lazily, one by one; STUDY and PATIENT: once every series is read).

    Each input record holds the attributes of one instance of the series plus
    ``NumberOfSeriesRelatedInstances``. IMAGE level is not aggregated (see the index).
    """
    if level == "SERIES":
        return (_with(s, LEVELS[:3]) for s in series)
    series = list(series)
    key = UNIQUE_KEY[level]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for s in series:
        groups.setdefault(_text(s.get(key)), []).append(s)
    out = []
    for members in groups.values():
        rec = _with(members[0], LEVELS[:LEVELS.index(level) + 1])
        instances = sum(int(m.get("NumberOfSeriesRelatedInstances") or 0) for m in members)
        if level == "STUDY":
            rec["ModalitiesInStudy"] = "\\".join(sorted({_text(m.get("Modality"))
                                                         for m in members} - {""}))
            rec["SOPClassesInStudy"] = "\\".join(sorted({_text(m.get("SOPClassUID"))
                                                         for m in members} - {""}))
            rec["NumberOfStudyRelatedSeries"] = len(members)
            rec["NumberOfStudyRelatedInstances"] = instances
        else:
            rec["NumberOfPatientRelatedStudies"] = len({_text(m.get("StudyInstanceUID"))
                                                        for m in members})
            rec["NumberOfPatientRelatedSeries"] = len(members)
            rec["NumberOfPatientRelatedInstances"] = instances
        out.append(rec)
    return out


def response_values(query: Query, record: Mapping[str, Any], retrieve_ae: str | None = None
                    ) -> list[tuple[str, str, Any]]:
    """``(keyword, VR, value)`` of every attribute answering ``query`` for ``record``: each
    requested key with our value (None: empty; a sequence: ``[]``), the level's unique
    key, and ``retrieve_ae`` as RetrieveAETitle. C-FIND's and QIDO-RS's answers alike."""
    values = {k.keyword: ANSWERED_KEYS[k.keyword] if k.keyword in ANSWERED_KEYS
              else record.get(k.keyword) for k in query.keys}
    values[UNIQUE_KEY[query.level]] = record.get(UNIQUE_KEY[query.level])
    if retrieve_ae:
        values["RetrieveAETitle"] = retrieve_ae
    vrs = {k.keyword: k.vr for k in query.keys}
    out = []
    for kw, value in values.items():
        vr = vrs.get(kw)
        if vr is None:
            try:
                vr = dictionary_VR(kw)
            except KeyError:
                continue
        out.append((kw, vr, [] if vr == "SQ" else _value_for(vr, value)))
    return out


def response(query: Query, record: Mapping[str, Any], retrieve_ae: str | None = None) -> Dataset:
    """The C-FIND response identifier: every requested key, with our value or empty."""
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level
    values = response_values(query, record, retrieve_ae)
    if any(not _text(v).isascii() for _, _, v in values):
        ds.SpecificCharacterSet = "ISO_IR 192"
    for kw, vr, value in values:
        _set(ds, kw, vr, value)
    return ds


def _value_for(vr: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    text = _text(value)
    if vr in ("IS",):
        try:
            return int(float(text.split("\\")[0])) if "\\" not in text else text
        except ValueError:
            return None
    if vr in ("US", "UL", "SS", "SL"):
        try:
            return int(float(text))
        except ValueError:
            return None
    if vr in ("FL", "FD"):
        try:
            return float(text)
        except ValueError:
            return None
    if "\\" in text and vr not in ("LT", "ST", "UT"):
        return text.split("\\")
    return text


def attribute_tag(keyword: str) -> int | None:
    """The tag of a response attribute named by keyword, or by its hex tag (private and
    unknown attributes); None for neither."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        try:
            tag = int(keyword, 16)
        except ValueError:
            return None
    return tag


def _set(ds: Dataset, keyword: str, vr: str, value: Any) -> None:
    tag = attribute_tag(keyword)
    if tag is not None:
        ds.add_new(tag, vr, value)
