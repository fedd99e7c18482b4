"""Query/Retrieve over the index: the records a C-FIND or QIDO-RS answers with and the
instances a C-MOVE, C-GET or WADO-RS sends. SQL narrows by the identifier's exact keys and,
at SERIES, STUDY and IMAGE level, to the candidates of :mod:`dicomnode.store.prefilter`
(a superset of the matches); matching is :mod:`dicomnode.store.query`'s. Records come
lazily, series in the order they were first received and studies in the order of their
first series, so a caller with a limit (QIDO-RS) stops reading the index at it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from typing import Any

from dicomnode.store.index import Index
from dicomnode.store.prefilter import Condition, conditions
from dicomnode.store.query import LEVELS, Query, aggregate, match, retrieve_selection


def _in(column: str, values: list[str]) -> tuple[str, list[str]]:
    return f"{column} IN ({', '.join('?' * len(values))})", values


# keys SQL narrows by (exact values or UID lists): their level, and their column. A
# series' Modality is the index's (its first received instance's: one for the series)
NARROWING = (("StudyInstanceUID", "STUDY", "s.study_uid"),
             ("SeriesInstanceUID", "SERIES", "s.series_uid"),
             ("Modality", "SERIES", "s.modality"),
             ("PatientID", "PATIENT", "json_extract(i.attrs, '$.PatientID')"))
# each series joined with its first instance (by instance number), whose attributes it has
FIRST_INSTANCE = (" JOIN instances i ON i.sop_instance_uid = (SELECT sop_instance_uid FROM"
                  " instances WHERE series_uid = s.series_uid ORDER BY instance_number,"
                  " sop_instance_uid LIMIT 1)")


def _narrowing(query: Query) -> tuple[list[str], list[Any]]:
    """SQL conditions on ``series s`` (joined with FIRST_INSTANCE ``i``) for the
    identifier's exact patient/study/series keys."""
    where: list[str] = ["s.instances > 0"]
    args: list[Any] = []
    for keyword, level, column in NARROWING:
        if LEVELS.index(level) > LEVELS.index(query.level):
            continue
        values = query.unique_values(keyword)
        if values:
            clause, vals = _in(column, values)
            where.append(clause)
            args += vals
    return where, args


# candidates (instances) few enough to read the series by and sort, rather than read
# every series in order and look each up among them
FEW = 5000


def _many(index: Index, c: Condition) -> bool:
    """Whether the condition has FEW candidate instances or more."""
    counted = 0
    for sql, args in c.parts:
        counted += index.db.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM instances WHERE {sql}"
                                    " LIMIT ?)", [*args, FEW - counted]).fetchone()[0]
        if counted >= FEW:
            return True
    return False


def _candidates(column: str, found: list[Condition], many: list[bool]
                ) -> tuple[list[str], list[Any]]:
    """``column`` (a series UID) among the series that meet every condition. Where a
    condition has ``many`` candidates, the unary ``+`` keeps SQLite from reading the series
    by them and sorting them all: it reads the series in order and stops where the caller
    does. Either way the same series, in the same order."""
    where, args = [], []
    for c, lots in zip(found, many, strict=True):
        sql, vals = c.series()
        where.append(f"{'+' if lots else ''}{column} IN ({sql})")
        args += vals
    return where, args


def _records(index: Index, where: list[str], args: list[Any], skip: int = 0
             ) -> Iterator[dict[str, Any]]:
    rows = index.db.execute(
        f"SELECT s.series_uid, s.study_uid, s.instances, i.attrs FROM series s{FIRST_INSTANCE}"
        f" WHERE {' AND '.join(where)} ORDER BY s.first_received LIMIT -1 OFFSET ?",
        [*args, skip])
    for r in rows:
        rec = json.loads(r["attrs"])
        rec["StudyInstanceUID"], rec["SeriesInstanceUID"] = r["study_uid"], r["series_uid"]
        rec["NumberOfSeriesRelatedInstances"] = r["instances"]
        yield rec


def series_records(index: Index, query: Query, prefilter: bool = False, skip: int = 0
                   ) -> Iterator[dict[str, Any]]:
    """One record per indexed series (attributes of its first instance + instance count),
    narrowed in SQL by the identifier's exact patient/study/series keys and, with
    ``prefilter`` (a SERIES or IMAGE level query), to the series that could match it;
    ``skip``: the first records left out."""
    where, args = _narrowing(query)
    if prefilter:
        # an exact Modality is narrowed by the series' own column (NARROWING) already
        found = [c for c in conditions(query)
                 if c.keyword != "Modality" or not query.unique_values("Modality")]
        more, more_args = _candidates("s.series_uid", found, [_many(index, c) for c in found])
        where, args = where + more, args + more_args
    return _records(index, where, args, skip)


def study_records(index: Index, query: Query, skip: int = 0) -> Iterator[dict[str, Any]]:
    """STUDY level records (:func:`~dicomnode.store.query.aggregate`'s), lazily in the
    order of each study's first series: the studies that could match are found in SQL,
    and each is aggregated from its own series alone (the first ``skip`` are not)."""
    where, args = _narrowing(query)
    join = FIRST_INSTANCE if any(w.startswith("json_extract(i.") for w in where) else ""
    found = conditions(query)
    # a study's attributes are its first series', so that series meets every condition on
    # them; ModalitiesInStudy is any of its series' Modality
    studies = []
    for group in ([c for c in found if c.keyword != "ModalitiesInStudy"],
                  [c for c in found if c.keyword == "ModalitiesInStudy"]):
        if group:
            clauses, vals = _candidates("series_uid", group, [False] * len(group))
            lots = all(_many(index, c) for c in group)
            studies.append(f"{'+' if lots else ''}s.study_uid IN (SELECT study_uid FROM"
                           f" series WHERE {' AND '.join(clauses)})")
            args = args + vals
    rows = index.db.execute(f"SELECT s.study_uid FROM series s{join} WHERE"
                            f" {' AND '.join(where + studies)}"
                            " ORDER BY s.first_received", args)
    seen: set[str] = set()
    member_where, member_args = _narrowing(query)
    for r in rows:
        study = r["study_uid"]
        if study in seen:
            continue
        seen.add(study)
        if len(seen) <= skip:
            continue
        members = _records(index, [*member_where, "s.study_uid = ?"], [*member_args, study])
        yield from aggregate(members, "STUDY")


def image_records(index: Index, query: Query) -> Iterator[dict[str, Any]]:
    """Instance records (with their index row under ``_row``) matching at IMAGE level."""
    above = Query("SERIES", query.keys)
    matching = (s["SeriesInstanceUID"] for s in series_records(index, above, prefilter=True)
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


def matches(index: Index, query: Query, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Records at ``query.level`` that match the identifier, lazily (series and images in
    the order received, studies in the order of their first series; a patient once all
    its series are read), less the first ``skip``."""
    if query.level == "IMAGE":
        yield from islice(image_records(index, query), skip, None)
        return
    # without a filtering key every record matches: the skipped ones are not even built
    early = skip if not query.filters() else 0
    if query.level == "STUDY":
        records = study_records(index, query, early)
    elif query.level == "SERIES":
        records = aggregate(series_records(index, query, True, early), "SERIES")
    else:
        records, early = aggregate(series_records(index, query), query.level), 0
    yield from islice((r for r in records if match(query, r)), skip - early, None)


def find(index: Index, query: Query) -> list[dict[str, Any]]:
    """Records at ``query.level`` that match the identifier."""
    return list(matches(index, query))


def retrieve_rows(index: Index, query: Query) -> list[Any]:
    """Index rows of every instance under the entities the identifier's unique keys select
    (:func:`~dicomnode.store.query.retrieve_selection`; raises QueryError for a bad one)."""
    return [r["_row"] for r in image_records(index,
                                             Query("IMAGE", retrieve_selection(query).keys))]
