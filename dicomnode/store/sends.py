"""The outbox table: one row per (instance, destination) to deliver by C-STORE.

The SQL behind ``dicomnode.dispatch.outbox``; states and their moves are described there.
Every function that changes rows is one committed transaction.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dicomnode.store.index import Index


class SendState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    UNCERTAIN = "uncertain"  # was sending when the node stopped: ask the peer first
    SENT = "sent"
    FAILED = "failed"


WAITING = (SendState.PENDING, SendState.UNCERTAIN)  # rows a dispatch pass may take


@dataclass(frozen=True)
class Queued:
    """What queueing a series did: ``superseded`` names the source series (and its state)
    whose newer input makes this derived series stale, in which case nothing was queued."""

    instances: int
    queued: int
    superseded: tuple[str, str] | None = None


@dataclass(frozen=True)
class Failure:
    """One failed attempt of one row, to be recorded."""

    row_id: int
    state: SendState          # where the row goes: pending / uncertain again, or failed
    next_attempt: float
    error: str
    status: int | None = None


def queue_series(index: Index, series_uid: str, destinations: Sequence[str],
                 superseding: Sequence[str], now: float) -> Queued:
    """Queue every instance of ``series_uid`` for each destination, in one transaction.

    An instance already queued or sent with the same content is left alone; one whose
    stored bytes changed since, or whose send failed, is queued anew. Nothing is queued
    when the series' source is in one of the ``superseding`` states.
    """
    queued = 0
    with index.transaction() as db:
        source = db.execute("SELECT s.series_uid, s.state FROM series d JOIN series s ON"
                            " s.series_uid = d.source_series_uid WHERE d.series_uid = ?",
                            (series_uid,)).fetchone()
        if source is not None and source["state"] in superseding:
            return Queued(0, 0, (source["series_uid"], source["state"]))
        rows = db.execute("SELECT sop_instance_uid, sha256 FROM instances WHERE series_uid = ?",
                          (series_uid,)).fetchall()
        for row in rows:
            for dest in destinations:
                old = db.execute("SELECT state, sha256 FROM outbox WHERE sop_instance_uid = ?"
                                 " AND destination = ?",
                                 (row["sop_instance_uid"], dest)).fetchone()
                if old is None:
                    db.execute(
                        "INSERT INTO outbox (sop_instance_uid, series_uid, destination, sha256,"
                        " state, created, next_attempt, updated) VALUES (?,?,?,?,?,?,?,?)",
                        (row["sop_instance_uid"], series_uid, dest, row["sha256"],
                         SendState.PENDING, now, now, now))
                    queued += 1
                elif old["sha256"] != row["sha256"] or old["state"] == SendState.FAILED:
                    _requeue(db, "sop_instance_uid = ? AND destination = ?",
                             (row["sop_instance_uid"], dest), now, sha256=row["sha256"])
                    queued += 1
    return Queued(len(rows), queued)


def _requeue(db: Any, where: str, args: tuple[Any, ...], now: float,
             sha256: str | None = None) -> int:
    sets = "state = ?, attempts = 0, created = ?, next_attempt = ?, updated = ?, error = NULL," \
           " status = NULL, sent_at = NULL"
    values: list[Any] = [SendState.PENDING, now, now, now]
    if sha256 is not None:
        sets += ", sha256 = ?"
        values.append(sha256)
    return db.execute(f"UPDATE outbox SET {sets} WHERE {where}", (*values, *args)).rowcount


def requeue(index: Index, states: Sequence[str], series_uid: str | None,
            destination: str | None, now: float) -> tuple[list[str], int]:
    """Queue again the rows in ``states`` (of one series, to one destination, where given);
    the series they belong to, and how many rows."""
    where, args = [f"state IN ({', '.join('?' * len(states))})"], list(states)
    if series_uid:
        where.append("series_uid = ?")
        args.append(series_uid)
    if destination:
        where.append("destination = ?")
        args.append(destination)
    clause = " AND ".join(where)
    with index.transaction() as db:
        uids = [r["series_uid"] for r in db.execute(
            f"SELECT DISTINCT series_uid FROM outbox WHERE {clause}", args)]
        return uids, _requeue(db, clause, tuple(args), now)


def mark_uncertain(index: Index, now: float) -> int:
    """Rows left ``sending`` by a crash become ``uncertain``; how many."""
    with index.transaction() as db:
        return db.execute("UPDATE outbox SET state = ?, next_attempt = ?, updated = ?"
                          " WHERE state = ?", (SendState.UNCERTAIN, now, now,
                                               SendState.SENDING)).rowcount


def due_destinations(index: Index, now: float) -> list[str]:
    """Destinations with rows waiting and due."""
    return [r["destination"] for r in index.db.execute(
        "SELECT DISTINCT destination FROM outbox WHERE state IN (?, ?) AND next_attempt <= ?",
        (*WAITING, now))]


def claim(index: Index, destination: str, now: float, state: str = SendState.PENDING,
          limit: int = -1) -> list[Any]:
    """Take up to ``limit`` (-1: all) due rows of ``destination`` in ``state``: they become
    ``sending`` with one more attempt, oldest first."""
    with index.transaction() as db:
        return db.execute(
            "UPDATE outbox SET state = ?, attempts = attempts + 1, updated = ? WHERE id IN"
            " (SELECT id FROM outbox WHERE destination = ? AND state = ? AND next_attempt"
            " <= ? ORDER BY id LIMIT ?) RETURNING *",
            (SendState.SENDING, now, destination, state, now, limit)).fetchall()


def locate(index: Index, row_ids: Sequence[int]) -> list[Any]:
    """``(sop_instance_uid, series_uid, study_uid)`` of the instances of outbox rows."""
    return index.db.execute(
        "SELECT i.sop_instance_uid, i.series_uid, s.study_uid FROM outbox o JOIN instances"
        " i USING (sop_instance_uid) JOIN series s ON s.series_uid = i.series_uid"
        f" WHERE o.id IN ({', '.join('?' * len(row_ids))})", list(row_ids)).fetchall()


def settle(index: Index, rows: Sequence[Any], held: set[str], now: float) -> None:
    """Rows whose instance the peer holds are sent; the others pending, due ``now``."""
    stamp = time.time()
    with index.transaction() as db:
        for r in rows:
            if r["sop_instance_uid"] in held:
                db.execute("UPDATE outbox SET state = ?, sent_at = ?, updated = ?,"
                           " error = NULL WHERE id = ?", (SendState.SENT, stamp, stamp, r["id"]))
            else:
                db.execute("UPDATE outbox SET state = ?, next_attempt = ?, updated = ?"
                           " WHERE id = ?", (SendState.PENDING, now, stamp, r["id"]))


def mark_sent(index: Index, row_id: int, status: int, transfer_syntax: str) -> None:
    now = time.time()
    with index.transaction() as db:
        db.execute("UPDATE outbox SET state = ?, sent_at = ?, updated = ?, status = ?,"
                   " transfer_syntax = ?, error = NULL WHERE id = ? AND state = ?",
                   (SendState.SENT, now, now, status, transfer_syntax, row_id,
                    SendState.SENDING))


def record_failures(index: Index, failures: Iterable[Failure], now: float) -> None:
    """Record failed attempts (made at ``now``) of rows still ``sending``, in one
    transaction."""
    with index.transaction() as db:
        for f in failures:
            db.execute("UPDATE outbox SET state = ?, next_attempt = ?, updated = ?, status = ?,"
                       " error = ? WHERE id = ? AND state = ?",
                       (f.state, f.next_attempt, now, f.status, f.error, f.row_id,
                        SendState.SENDING))


def release(index: Index, row_ids: Sequence[int]) -> int:
    """Rows still ``sending`` go back to pending, due now; how many."""
    now = time.time()
    with index.transaction() as db:
        return sum(db.execute("UPDATE outbox SET state = ?, next_attempt = ?, updated = ?"
                              " WHERE id = ? AND state = ?",
                              (SendState.PENDING, now, now, i, SendState.SENDING)).rowcount
                   for i in row_ids)


def state_counts(index: Index, series_uid: str) -> dict[str, int]:
    """Rows of a series per state."""
    return {r["state"]: r["n"] for r in index.db.execute(
        "SELECT state, COUNT(*) AS n FROM outbox WHERE series_uid = ? GROUP BY state",
        (series_uid,))}


def last_failure(index: Index, series_uid: str) -> Any:
    """The most recently failed row of a series (destination, error), or None."""
    return index.db.execute("SELECT destination, error FROM outbox WHERE series_uid = ?"
                            " AND state = ? ORDER BY updated DESC LIMIT 1",
                            (series_uid, SendState.FAILED)).fetchone()


def summary(index: Index) -> dict[str, dict[str, dict[str, int]]]:
    """``{series_uid: {destination: {state: count}}}``."""
    out: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    for r in index.db.execute("SELECT series_uid, destination, state, COUNT(*) AS n FROM outbox"
                              " GROUP BY series_uid, destination, state"):
        out[r["series_uid"]][r["destination"]][r["state"]] = r["n"]
    return {k: dict(v) for k, v in out.items()}


def last_errors(index: Index) -> dict[str, tuple[str, str]]:
    """The most recent (destination, error) of each series with a send not sent."""
    rows = index.db.execute("SELECT series_uid, destination, error FROM outbox WHERE error IS"
                            " NOT NULL AND state != ? ORDER BY updated", (SendState.SENT,))
    return {r["series_uid"]: (r["destination"], r["error"]) for r in rows}
