"""Query/Retrieve over the index: the records a C-FIND answers with and the instances a
C-MOVE or C-GET sends. SQL narrows by the identifier's exact keys; matching is
:mod:`dicomnode.store.query`'s."""

from __future__ import annotations

import json
from typing import Any

from dicomnode.store.index import Index
from dicomnode.store.query import LEVELS, Query, aggregate, match, retrieve_selection


def _in(column: str, values: list[str]) -> tuple[str, list[str]]:
    return f"{column} IN ({', '.join('?' * len(values))})", values


def series_records(index: Index, query: Query) -> list[dict[str, Any]]:
    """One record per indexed series (attributes of its first instance + instance count),
    narrowed in SQL by the identifier's exact patient/study/series keys."""
    where, args = ["s.instances > 0"], []
    for keyword, column in (("StudyInstanceUID", "s.study_uid"),
                            ("SeriesInstanceUID", "s.series_uid"),
                            ("PatientID", "json_extract(i.attrs, '$.PatientID')")):
        if LEVELS.index({"PatientID": "PATIENT", "StudyInstanceUID": "STUDY",
                         "SeriesInstanceUID": "SERIES"}[keyword]) > LEVELS.index(query.level):
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
        f" WHERE {' AND '.join(where)} ORDER BY s.first_received", args).fetchall()
    out = []
    for r in rows:
        rec = json.loads(r["attrs"])
        rec["StudyInstanceUID"], rec["SeriesInstanceUID"] = r["study_uid"], r["series_uid"]
        rec["NumberOfSeriesRelatedInstances"] = r["instances"]
        out.append(rec)
    return out


def image_records(index: Index, query: Query) -> list[dict[str, Any]]:
    """Instance records (with their index row under ``_row``) matching at IMAGE level."""
    above = Query("SERIES", query.keys)
    series = [s["SeriesInstanceUID"] for s in series_records(index, above)
              if match(above, s)]
    out = []
    sops = query.unique_values("SOPInstanceUID")
    for start in range(0, len(series), 500):
        clause, args = _in("series_uid", series[start:start + 500])
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
                out.append(rec)
    return out


def find(index: Index, query: Query) -> list[dict[str, Any]]:
    """Records at ``query.level`` that match the identifier."""
    if query.level == "IMAGE":
        return image_records(index, query)
    records = aggregate(series_records(index, query), query.level)
    return [r for r in records if match(query, r)]


def retrieve_rows(index: Index, query: Query) -> list[Any]:
    """Index rows of every instance under the entities the identifier's unique keys select
    (:func:`~dicomnode.store.query.retrieve_selection`; raises QueryError for a bad one)."""
    return [r["_row"] for r in image_records(index,
                                             Query("IMAGE", retrieve_selection(query).keys))]
