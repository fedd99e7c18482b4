"""QIDO-RS (PS3.18 10.6): studies, series and instances, matched exactly as C-FIND matches
(:func:`dicomnode.store.lookup.matches`, :mod:`dicomnode.store.query`), answered as DICOM
JSON with each result's RetrieveURL.

Query parameters are attributes by keyword or tag (``Modality=CT``, ``00100020=123``), with
C-FIND's matching (wildcards, ranges, UID lists: comma- or backslash-separated);
``includefield`` (a list, or ``all``) adds attributes to return; ``limit`` and ``offset``
page; ``fuzzymatching`` is accepted and ignored (matching is exact). At most
:data:`MAX_RESULTS` results a request: more are announced by a Warning header.
"""

from __future__ import annotations

import json
from itertools import islice
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dicomnode.store.lookup import matches
from dicomnode.store.query import KEY_LEVEL, LEVEL_KEYS, LEVELS, Key, Query, response_values
from dicomnode.web.context import context_of
from dicomnode.web.dicomweb.common import (
    DICOM_JSON,
    dicom_json,
    path_keys,
    problem,
    resource_url,
)

MAX_RESULTS = 1000  # the most one request returns (limit=...)
DEFAULT_LIMIT = 100  # without a limit: clients page on with offset
CONTROL = {"limit", "offset", "fuzzymatching", "includefield"}
# returned whatever was asked (PS3.18 Table 10.6.3-3 to -5, as far as the index keeps them)
DEFAULT_KEYS = {
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances", "StudyDescription"),
    "SERIES": ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
               "NumberOfSeriesRelatedInstances", "SeriesDate", "SeriesTime"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
              "NumberOfFrames"),
}
ANSWERED = ("InstanceAvailability", "TimezoneOffsetFromUTC")


class BadQuery(ValueError):
    """A query parameter that cannot be used (400)."""


def _keyword(name: str) -> str:
    """An attribute named by keyword or by tag (``00100010``)."""
    if tag_for_keyword(name) is not None:
        return name
    if len(name) == 8:
        try:
            keyword = keyword_for_tag(int(name, 16))
        except ValueError:
            keyword = ""
        if keyword:
            return keyword
    raise BadQuery(f"{name} is not an attribute keyword or tag (sequence paths are not"
                   " supported)")


def _int(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise BadQuery(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def build_query(request: Request, level: str) -> Query:
    """The C-FIND identifier this request amounts to: its path's UIDs and its filters as
    matching keys, the level's default attributes and ``includefield`` as return keys."""
    keys: dict[str, Key] = {k.keyword: k for k in path_keys(request)}
    returned = list(DEFAULT_KEYS[level])
    for upper in LEVELS[1:LEVELS.index(level)]:
        if f"{upper.lower()}" not in request.path_params and upper != "PATIENT":
            returned += DEFAULT_KEYS[upper]
    for name, value in request.query_params.multi_items():
        if name == "includefield":
            for field in value.split(","):
                if field.strip() == "all":
                    returned += [k for lv in LEVELS[:LEVELS.index(level) + 1]
                                 for k in LEVEL_KEYS[lv]]
                elif field.strip():
                    returned.append(_keyword(field.strip()))
            continue
        if name in CONTROL:
            continue
        keyword = _keyword(name)
        vr = dictionary_VR(keyword)
        if vr == "SQ":
            raise BadQuery(f"{keyword} is a sequence: sequence matching is not supported")
        if vr == "UI":
            value = value.replace(",", "\\")
        keys[keyword] = Key(keyword, vr, value)
    for keyword in [*returned, *ANSWERED]:
        if keyword not in keys:
            keys[keyword] = Key(keyword, dictionary_VR(keyword), "")
    unknown = [k for k in keys.values() if k.value and k.keyword not in KEY_LEVEL]
    if unknown:
        raise BadQuery(f"{unknown[0].keyword} is not a key the node can match on")
    return Query(level, tuple(keys.values()))


def _answer(request: Request, query: Query, record: dict[str, Any], ae_title: str
            ) -> dict[str, Any]:
    """One result: C-FIND's answer for the record, with its RetrieveURL."""
    study, series = record.get("StudyInstanceUID"), record.get("SeriesInstanceUID")
    instance = record.get("SOPInstanceUID") if query.level == "IMAGE" else None
    url = resource_url(request, str(study), series if query.level != "STUDY" else None,
                       instance)
    return dicom_json([*response_values(query, record, ae_title), ("RetrieveURL", "UR", url)])


def search(request: Request, level: str) -> Response:
    ctx = context_of(request)
    try:
        query = build_query(request, level)
        limit = min(_int(request, "limit", DEFAULT_LIMIT), MAX_RESULTS)
        offset = _int(request, "offset", 0)
    except BadQuery as exc:
        return problem(400, str(exc))
    found = list(islice(matches(ctx.index, query, offset), limit + 1))
    headers = {}
    if len(found) > limit:
        found = found[:limit]
        headers["Warning"] = ('299 dicomnode: "There are additional results that can be'
                              ' requested"')
    body = [_answer(request, query, r, ctx.config.node.ae_title) for r in found]
    return Response(json.dumps(body), media_type=DICOM_JSON, headers=headers)


def studies(request: Request) -> Response:
    return search(request, "STUDY")


def series(request: Request) -> Response:
    return search(request, "SERIES")


def instances(request: Request) -> Response:
    return search(request, "IMAGE")


ROUTES = [
    Route("/studies", studies, methods=["GET"]),
    Route("/series", series),
    Route("/instances", instances),
    Route("/studies/{study}/series", series),
    Route("/studies/{study}/instances", instances),
    Route("/studies/{study}/series/{series}/instances", instances),
]
