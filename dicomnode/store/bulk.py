"""Indexing many instances at once, without their files: large indexes for benchmarks and
tests (``bench/web.py`` fills one with 100,000 series this way). One transaction; each
row as the receive path would have written it, in the state and route given."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from dicomnode.store.index import Index, InstanceRecord


@dataclass(frozen=True)
class BulkInstance:
    record: InstanceRecord
    received: float  # epoch seconds
    state: str  # of its series
    route: str | None = None
    kind: str = "original"


def insert(index: Index, rows: Iterable[BulkInstance]) -> int:
    """Index ``rows`` (series created at their first instance); how many instances."""
    count = 0
    with index.transaction() as db:
        for row in rows:
            rec = row.record
            db.execute(
                "INSERT INTO series (series_uid, study_uid, kind, state, instances, modality,"
                " first_received, last_received, updated_at, route) VALUES (?,?,?,?,1,?,?,?,?,?)"
                " ON CONFLICT (series_uid) DO UPDATE SET instances = instances + 1,"
                " last_received = MAX(last_received, excluded.last_received)",
                (rec.series_uid, rec.study_uid, row.kind, row.state, rec.modality, row.received,
                 row.received, row.received, row.route))
            db.execute(
                "INSERT INTO instances (sop_instance_uid, series_uid, sop_class_uid,"
                " transfer_syntax, path, size, sha256, instance_number, received_at, attrs)"
                " VALUES (?,?,?,?,?,0,'',?,?,?)",
                (rec.sop_instance_uid, rec.series_uid, rec.sop_class_uid, rec.transfer_syntax,
                 f"bulk/{rec.sop_instance_uid}.dcm", rec.instance_number, row.received,
                 json.dumps(rec.attrs)))
            count += 1
    return count
