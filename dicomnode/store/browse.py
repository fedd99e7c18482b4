"""What the web console reads from the index: pages of series, counts, running jobs, the
last hour's throughput, recent errors and each peer's sends. Read-only; every query is
answered from an index (``dicomnode.store.index`` SCHEMA), so pages stay fast with
hundreds of thousands of series.

Series pages are newest first (by first instance received) and keyed, not offset: a page
starts after the last row of the one before it, so page 2,000 costs what page 1 costs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dicomnode.store.index import Index, JobState, SeriesState
from dicomnode.store.sends import SendState

PAGE = 50


@dataclass(frozen=True)
class SeriesFilter:
    """The series list's filters; empty ones do not restrict. ``since``/``until`` bound
    when the series' first instance was received (epoch seconds, until exclusive)."""

    state: str = ""
    route: str = ""
    modality: str = ""
    kind: str = ""
    since: float | None = None
    until: float | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = ["1"], []
        for column in ("state", "route", "modality", "kind"):
            value = getattr(self, column)
            if value:
                clauses.append(f"s.{column} = ?")
                args.append(value)
        if self.since is not None:
            clauses.append("s.first_received >= ?")
            args.append(self.since)
        if self.until is not None:
            clauses.append("s.first_received < ?")
            args.append(self.until)
        return " AND ".join(clauses), args


@dataclass(frozen=True)
class Cursor:
    """A position in the newest-first order: (first_received, series_uid) of a row."""

    received: float
    series_uid: str

    def text(self) -> str:
        return f"{self.received!r}_{self.series_uid}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        received, _, uid = text.partition("_")
        return cls(float(received), uid)


def _first_attrs(index: Index, series_uid: str) -> dict[str, Any]:
    """The indexed attributes of a series' first instance (by instance number)."""
    row = index.db.execute("SELECT attrs FROM instances WHERE series_uid = ? ORDER BY"
                           " instance_number, sop_instance_uid LIMIT 1",
                           (series_uid,)).fetchone()
    return json.loads(row["attrs"]) if row else {}


def series_page(index: Index, where: SeriesFilter, after: Cursor | None = None,
                before: Cursor | None = None, limit: int = PAGE) -> list[dict[str, Any]]:
    """Up to ``limit`` series newest first, older than ``after`` (the next page) or just
    newer than ``before`` (the previous one); each row with its first instance's
    attributes under ``attrs``."""
    clause, args = where.where()
    order = "DESC"
    if after is not None:
        clause += " AND (s.first_received, s.series_uid) < (?, ?)"
        args += [after.received, after.series_uid]
    elif before is not None:
        clause += " AND (s.first_received, s.series_uid) > (?, ?)"
        args += [before.received, before.series_uid]
        order = "ASC"
    rows = index.db.execute(f"SELECT * FROM series s WHERE {clause} ORDER BY"
                            f" s.first_received {order}, s.series_uid {order} LIMIT ?",
                            [*args, limit]).fetchall()
    if order == "ASC":
        rows.reverse()
    return [{**dict(r), "attrs": _first_attrs(index, r["series_uid"])} for r in rows]


def count_series(index: Index, where: SeriesFilter) -> int:
    clause, args = where.where()
    return index.db.execute(f"SELECT COUNT(*) FROM series s WHERE {clause}", args
                            ).fetchone()[0]


def state_counts(index: Index) -> dict[str, int]:
    """Series per state, every state listed (0 where none)."""
    counts = {str(s): 0 for s in SeriesState}
    for r in index.db.execute("SELECT state, COUNT(*) AS n FROM series GROUP BY state"):
        counts[r["state"]] = r["n"]
    return counts


def queue_depth(index: Index) -> int:
    """Jobs waiting for a worker."""
    return index.db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?",
                            (JobState.QUEUED,)).fetchone()[0]


def running_jobs(index: Index) -> list[Any]:
    """Jobs being run: id, series, attempt, when claimed (``updated``), its instances."""
    return index.db.execute(
        "SELECT j.id, j.series_uid, j.attempts, j.updated AS claimed, s.instances, s.modality"
        " FROM jobs j JOIN series s USING (series_uid) WHERE j.state = ? ORDER BY j.id",
        (JobState.RUNNING,)).fetchall()


def throughput(index: Index, since: float, destinations: list[str]) -> dict[str, int]:
    """Since ``since``: series whose first instance arrived, harmonisation jobs done, and
    instances sent to each of ``destinations`` (together)."""
    db = index.db
    received = db.execute("SELECT COUNT(*) FROM series WHERE first_received >= ?",
                          (since,)).fetchone()[0]
    harmonised = db.execute("SELECT COUNT(*) FROM jobs WHERE state = ? AND updated >= ?",
                            (JobState.DONE, since)).fetchone()[0]
    sent = sum(db.execute("SELECT COUNT(*) FROM outbox WHERE destination = ? AND state = ?"
                          " AND sent_at >= ?", (d, SendState.SENT, since)).fetchone()[0]
               for d in destinations)
    return {"series_received": received, "jobs_done": harmonised, "instances_sent": sent}


def recent_errors(index: Index, limit: int = 10) -> list[Any]:
    """The series that failed or carry an error most recently."""
    return index.db.execute("SELECT series_uid, kind, state, error, updated_at FROM series"
                            " WHERE error IS NOT NULL ORDER BY updated_at DESC LIMIT ?",
                            (limit,)).fetchall()


def peer_sends(index: Index, destination: str) -> dict[str, Any]:
    """A destination's last confirmed send and its rows by state (sent ones not counted)."""
    db = index.db
    last = db.execute("SELECT MAX(sent_at) FROM outbox WHERE destination = ? AND state = ?",
                      (destination, SendState.SENT)).fetchone()[0]
    waiting = {r["state"]: r["n"] for r in db.execute(
        "SELECT state, COUNT(*) AS n FROM outbox WHERE destination = ? AND state != ?"
        " GROUP BY state", (destination, SendState.SENT))}
    return {"last_sent": last, "waiting": waiting}


def series_instances(index: Index, series_uid: str, limit: int = 500) -> list[Any]:
    return index.db.execute(
        "SELECT sop_instance_uid, sop_class_uid, transfer_syntax, size, instance_number,"
        " received_at FROM instances WHERE series_uid = ? ORDER BY instance_number,"
        " sop_instance_uid LIMIT ?", (series_uid, limit)).fetchall()


def series_jobs(index: Index, series_uid: str) -> list[Any]:
    return index.db.execute("SELECT * FROM jobs WHERE series_uid = ? ORDER BY id",
                            (series_uid,)).fetchall()


def series_sends(index: Index, series_uid: str) -> dict[str, dict[str, Any]]:
    """Per destination: rows by state, the last send and the last error."""
    out: dict[str, dict[str, Any]] = {}
    for r in index.db.execute(
            "SELECT destination, state, COUNT(*) AS n, MAX(sent_at) AS last_sent FROM outbox"
            " WHERE series_uid = ? GROUP BY destination, state", (series_uid,)):
        dest = out.setdefault(r["destination"], {"states": {}, "last_sent": None,
                                                 "error": None})
        dest["states"][r["state"]] = r["n"]
        if r["last_sent"]:
            dest["last_sent"] = max(dest["last_sent"] or 0, r["last_sent"])
    for r in index.db.execute(
            "SELECT destination, error FROM outbox WHERE series_uid = ? AND error IS NOT NULL"
            " ORDER BY updated", (series_uid,)):
        out[r["destination"]]["error"] = r["error"]
    return out
