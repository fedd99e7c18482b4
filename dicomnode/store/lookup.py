"""Query/Retrieve over the index: the records a C-FIND or QIDO-RS answers with and the
instances a C-MOVE, C-GET or WADO-RS sends. SQL narrows by the identifier's exact keys;
matching is :mod:`dicomnode.store.query`'s. Records come lazily, in the order series were
first received, so a caller with a limit (QIDO-RS) stops reading the index at it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from typing import Any

from dicomnode.store.index import Index
from dicomnode.store.query import LEVELS, Query, aggregate, match, retrieve_selection


def _in(column: str, values: list[str]) -> tuple[str, list[str]]:
    return f"{column} IN ({', '.join('?' * len(values))})", values


# keys SQL narrows by (exact values or UID lists): their level, and their column. A
# series' Modality is the index's (its first received instance's: one for the series)
NARROWING = (("StudyInstanceUID", "STUDY", "s.study_uid"),
             ("SeriesInstanceUID", "SERIES", "s.series_uid"),
             ("Modality", "SERIES", "s.modality"),
             ("PatientID", "PATIENT", "json_extract(i.attrs, '$.PatientID')"))


def series_records(index: Index, query: Query) -> Iterator[dict[str, Any]]:
    """One record per indexed series (attributes of its first instance + instance count),
    narrowed in SQL by the identifier's exact patient/study/series keys."""
    where, args = ["s.instances > 0"], []
    for keyword, level, column in NARROWING:
        if LEVELS.index(level) > LEVELS.index(query.level):
            continue
        values = query.unique_values(keyword)
        if values:
            clause, vals = _in(column, values)
            where.append(clause)
            args += vals
    rows = index.db.execute(
        "SELECT s.series_uid, s.study_uid, s.instances, i.attrs FROM series s JOIN instances i"
        " ON i.sop_instance_uid = (SELECT sop_instance_uid FROM instances WHERE series_uid ="
        " s.series_uid ORDER BY instance_number, sop_instance_uid LIMIT 1)"
        f" WHERE {' AND '.join(where)} ORDER BY s.first_received", args)
    for r in rows:
        rec = json.loads(r["attrs"])
        rec["StudyInstanceUID"], rec["SeriesInstanceUID"] = r["study_uid"], r["series_uid"]
        rec["NumberOfSeriesRelatedInstances"] = r["instances"]
        yield rec


def image_records(index: Index, query: Query) -> Iterator[dict[str, Any]]:
    """Instance records (with their index row under ``_row``) matching at IMAGE level."""
    above = Query("SERIES", query.keys)
    matching = (s["SeriesInstanceUID"] for s in series_records(index, above)
                if match(above, s))
    sops = query.unique_values("SOPInstanceUID")
    while series := list(islice(matching, 500)):
        clause, args = _in("series_uid", series)
        if sops:
            sop_clause, sop_args = _in("sop_instance_uid", sops)
            clause, args = f"{clause} AND {sop_clause}", args + sop_args
        for r in index.db.execute(f"SELECT * FROM instances WHERE {clause}"
                                  " ORDER BY series_uid, instance_number, sop_instance_uid", args):
            rec = json.loads(r["attrs"])
            rec.update(SOPInstanceUID=r["sop_instance_uid"], SOPClassUID=r["sop_class_uid"],
                       SeriesInstanceUID=r["series_uid"], _row=r)
            if r["instance_number"] is not None:
                rec["InstanceNumber"] = r["instance_number"]
            if match(query, rec):
                yield rec


def matches(index: Index, query: Query) -> Iterator[dict[str, Any]]:
    """Records at ``query.level`` that match the identifier, lazily (series and images in
    the order received; a study or patient once all its series are read)."""
    if query.level == "IMAGE":
        yield from image_records(index, query)
        return
    records = aggregate(series_records(index, query), query.level)
    yield from (r for r in records if match(query, r))


def find(index: Index, query: Query) -> list[dict[str, Any]]:
    """Records at ``query.level`` that match the identifier."""
    return list(matches(index, query))


def retrieve_rows(index: Index, query: Query) -> list[Any]:
    """Index rows of every instance under the entities the identifier's unique keys select
    (:func:`~dicomnode.store.query.retrieve_selection`; raises QueryError for a bad one)."""
    return [r["_row"] for r in image_records(index,
                                             Query("IMAGE", retrieve_selection(query).keys))]
