"""The commitments table: storage commitment requests, until reported to the requester.

The SQL behind ``dicomnode.scp.commitment`` (requests in) and
``dicomnode.dispatch.commitment`` (reports out).
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

from dicomnode.store.index import Index

Reference = tuple[str, str]  # (SOP Class UID, SOP Instance UID)


class CommitmentState(StrEnum):
    PENDING = "pending"
    REPORTED = "reported"
    FAILED = "failed"


def record_request(index: Index, requester: str, transaction: str, refs: list[Reference],
                   now: float | None = None) -> None:
    """Persist a request, due for reporting now. The same Transaction UID again (a peer
    retrying an N-ACTION whose response it lost) replaces it and is reported anew."""
    now = time.time() if now is None else now
    with index.transaction() as db:
        db.execute("INSERT OR REPLACE INTO commitments (transaction_uid, requester, refs,"
                   " state, attempts, created, next_attempt, updated)"
                   " VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
                   (transaction, requester, json.dumps(refs), CommitmentState.PENDING, now,
                    now, now))


def due(index: Index, now: float) -> list[Any]:
    """Pending requests due for a report attempt, oldest first."""
    return index.db.execute("SELECT * FROM commitments WHERE state = ? AND next_attempt <= ?"
                            " ORDER BY created", (CommitmentState.PENDING, now)).fetchall()


def references(row: Any) -> list[Reference]:
    return [(cls, uid) for cls, uid in json.loads(row["refs"])]


def mark_reported(index: Index, transaction: str, committed: int, failed: int) -> None:
    """The requester took the report; the instance list is not needed any more (a row per
    study stays small)."""
    with index.transaction() as db:
        db.execute("UPDATE commitments SET state = ?, updated = ?, committed = ?,"
                   " failed = ?, error = NULL, refs = '[]' WHERE transaction_uid = ?",
                   (CommitmentState.REPORTED, time.time(), committed, failed, transaction))


def record_failure(index: Index, transaction: str, attempts: int, given_up: bool,
                   next_attempt: float, error: str, now: float) -> None:
    """One failed report attempt, made at ``now``, of a pending request."""
    with index.transaction() as db:
        db.execute("UPDATE commitments SET state = ?, attempts = ?, next_attempt = ?,"
                   " updated = ?, error = ? WHERE transaction_uid = ? AND state = ?",
                   (CommitmentState.FAILED if given_up else CommitmentState.PENDING, attempts,
                    next_attempt, now, error, transaction, CommitmentState.PENDING))


def summary(index: Index) -> dict[str, Any]:
    """Requests per state, and the last error of one not reported, for ``dicomnode status``."""
    states = {r["state"]: r["n"] for r in index.db.execute(
        "SELECT state, COUNT(*) AS n FROM commitments GROUP BY state")}
    last = index.db.execute("SELECT requester, error FROM commitments WHERE state != ? AND"
                            " error IS NOT NULL ORDER BY updated DESC LIMIT 1",
                            (CommitmentState.REPORTED,)).fetchone()
    return {"states": states,
            "last_error": f"report to {last['requester']}: {last['error']}" if last else None}
