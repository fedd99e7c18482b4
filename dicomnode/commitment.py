"""Storage Commitment Push Model SCP (PS3.4 Annex J; IHE RAD-10).

A scanner or PACS that sent instances asks (N-ACTION "Request Storage Commitment")
whether the node has taken responsibility for them, and deletes its own copies once told
so. The answer is an N-EVENT-REPORT that the node sends later, on an association it opens
to the requester: the requester's ``[[peers]]`` entry says where. That is how Orthanc and
most modalities expect it, and why a requester without an entry with a port is refused at
once rather than never answered.

The request is committed to the index before the N-ACTION is answered Success, so a
restart never loses one; a scheduled pass reports pending requests, retrying an
unreachable requester with the outbox's back-off (``[outbox] retry_initial``,
``retry_max_interval``) and giving up after ``max_age_hours``. An instance is committed
when it is indexed under the SOP class asked about and its file is on disk: its C-STORE
was answered Success only once both were durable. One the node does not hold yet may still
be arriving on another association, so a report with failures waits until the request is
``series_timeout`` seconds old. A crash after the peer took the report
and before the node recorded it sends the report again; the peer matches it by
Transaction UID.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import build_context, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel
from pynetdicom.status import code_to_category

from dicomnode.client import associate, refusal
from dicomnode.config import Config
from dicomnode.index import Index
from dicomnode.log import get_logger
from dicomnode.outbox import after_failure

if TYPE_CHECKING:
    from dicomnode.scp import ScpContext

log = get_logger("commitment")

PUSH_MODEL = StorageCommitmentPushModel
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # the Push Model's well-known SOP instance
REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # Event Type IDs
PENDING, REPORTED, FAILED = "pending", "reported", "failed"

# N-ACTION statuses (PS3.7 Annex C) and Failure Reasons (PS3.4 Annex J)
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_INSTANCE = 0x0112  # also the Failure Reason "no such object instance"
INVALID_ARGUMENT_VALUE = 0x0115
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213

Reference = tuple[str, str]  # (SOP Class UID, SOP Instance UID)


class RefusedRequest(ValueError):
    """An N-ACTION the node will not take on: ``status`` and a reason for the peer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# --- the request ----------------------------------------------------------------------

def parse_request(action_type: int, requested_instance: str,
                  info: Dataset | None) -> tuple[str, list[Reference]]:
    """The Transaction UID and the (class, instance) pairs of a commitment request.
    Raises :class:`RefusedRequest` with the N-ACTION status for what is wrong."""
    if requested_instance != WELL_KNOWN_INSTANCE:
        raise RefusedRequest(NO_SUCH_SOP_INSTANCE,
                             f"requested SOP instance is not {WELL_KNOWN_INSTANCE}")
    if action_type != REQUEST_COMMITMENT:
        raise RefusedRequest(NO_SUCH_ACTION, f"action type {action_type} is not 1 (request)")
    transaction = str(getattr(info, "TransactionUID", "") or "")
    if not transaction:
        raise RefusedRequest(INVALID_ARGUMENT_VALUE, "no Transaction UID")
    refs = []
    for item in getattr(info, "ReferencedSOPSequence", None) or []:
        cls = str(item.get("ReferencedSOPClassUID", "") or "")
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not cls or not uid:
            raise RefusedRequest(INVALID_ARGUMENT_VALUE,
                                 "a Referenced SOP item lacks its class or instance UID")
        refs.append((cls, uid))
    if not refs:
        raise RefusedRequest(INVALID_ARGUMENT_VALUE, "empty Referenced SOP Sequence")
    return transaction, refs


def reachable_requester(config: Config, calling_ae: str) -> None:
    """Refuse a request whose report the node could not deliver."""
    peer = config.peer(calling_ae)
    if peer is None or peer.port is None:
        raise RefusedRequest(PROCESSING_FAILURE,
                             f"no [[peers]] port for {calling_ae} to report to")


def record_request(index: Index, requester: str, transaction: str, refs: list[Reference],
                   now: float | None = None) -> None:
    """Persist a request, due for reporting now. The same Transaction UID again (a peer
    retrying an N-ACTION whose response it lost) replaces it and is reported anew."""
    now = time.time() if now is None else now
    with index.transaction() as db:
        db.execute("INSERT OR REPLACE INTO commitments (transaction_uid, requester, refs,"
                   " state, attempts, created, next_attempt, updated)"
                   " VALUES (?, ?, ?, ?, 0, ?, ?, ?)",
                   (transaction, requester, json.dumps(refs), PENDING, now, now, now))


def handle_n_action(event: evt.Event, ctx: ScpContext) -> tuple[Dataset, None]:
    """N-ACTION on the Push Model: Success once the request is in the index."""
    calling = event.assoc.requestor.ae_title.strip()
    request = event.request
    status = Dataset()
    try:
        transaction, refs = parse_request(int(request.ActionTypeID),
                                          str(request.RequestedSOPInstanceUID),
                                          event.action_information)
        reachable_requester(ctx.config, calling)
        record_request(ctx.index, calling, transaction, refs)
    except RefusedRequest as exc:
        status.Status, status.ErrorComment = exc.status, str(exc)[:64]
        log.warning("commitment_refused", calling_ae=calling, reason=str(exc),
                    status=f"0x{exc.status:04X}")
        return status, None
    except (OSError, sqlite3.Error) as exc:
        status.Status = RESOURCE_LIMITATION
        log.error("commitment_not_recorded", calling_ae=calling,
                  error_type=type(exc).__name__, reason=str(exc))
        return status, None
    except Exception as exc:  # an undecodable Action Information: its type, not its bytes
        status.Status = PROCESSING_FAILURE
        log.warning("commitment_refused", calling_ae=calling, reason=type(exc).__name__,
                    status=f"0x{PROCESSING_FAILURE:04X}")
        return status, None
    log.info("commitment_requested", calling_ae=calling, transaction_uid=transaction,
             instances=len(refs))
    status.Status = SUCCESS
    return status, None


def commitment_handlers(ctx: ScpContext) -> list[tuple[Any, ...]]:
    return [(evt.EVT_N_ACTION, handle_n_action, [ctx])]


def add_commitment_context(ae: Any) -> None:
    ae.add_supported_context(PUSH_MODEL)


# --- the report -----------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    committed: list[Reference]
    failed: list[tuple[str, str, int]]  # (class, instance, Failure Reason)


def judge(config: Config, index: Index, refs: list[Reference]) -> Verdict:
    """Which referenced instances the node holds: indexed under that class, file on disk."""
    committed, failed = [], []
    for cls, uid in refs:
        row = index.instance(uid)
        if row is None or not (config.node.data_dir / row["path"]).is_file():
            failed.append((cls, uid, NO_SUCH_SOP_INSTANCE))
        elif row["sop_class_uid"] != cls:
            failed.append((cls, uid, CLASS_INSTANCE_CONFLICT))
        else:
            committed.append((cls, uid))
    return Verdict(committed, failed)


def event_information(transaction: str, verdict: Verdict, retrieve_ae: str) -> Dataset:
    """The N-EVENT-REPORT's Event Information: where to retrieve the
    committed instances, and why each of the others failed."""
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.RetrieveAETitle = retrieve_ae
    if verdict.committed:
        ds.ReferencedSOPSequence = [reference_item(cls, uid) for cls, uid in verdict.committed]
    if verdict.failed:
        ds.FailedSOPSequence = [reference_item(cls, uid, reason)
                                for cls, uid, reason in verdict.failed]
    return ds


def reference_item(cls: str, uid: str, failure: int | None = None) -> Dataset:
    """A Referenced SOP (or, with its Failure Reason, a Failed SOP) Sequence item."""
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, uid
    if failure is not None:
        item.FailureReason = failure
    return item


@dataclass
class Reporter:
    """Reports due requests; ``dispatch`` is one pass, run by the node's scheduler."""

    config: Config
    index: Index

    def dispatch(self, now: float | None = None) -> int:
        """Try every due request once; returns how many were tried."""
        now = time.time() if now is None else now
        rows = self.index.db.execute("SELECT * FROM commitments WHERE state = ? AND"
                                     " next_attempt <= ? ORDER BY created",
                                     (PENDING, now)).fetchall()
        for row in rows:
            try:
                self._report(row, now)
            except Exception as exc:  # any failure is retried; logged by type
                self._failed_attempt(row, type(exc).__name__)
        return len(rows)

    def _report(self, row: Any, now: float) -> None:
        peer = self.config.peer(row["requester"])
        if peer is None or peer.port is None:  # the config changed since the request
            self._failed_attempt(row, f"no [[peers]] port for {row['requester']}",
                                 permanent=True)
            return
        verdict = judge(self.config, self.index, [tuple(r) for r in json.loads(row["refs"])])
        if verdict.failed and now - row["created"] < self.config.node.series_timeout:
            return  # may still be arriving on another association: ask again next pass
        info = event_information(row["transaction_uid"], verdict, self.config.node.ae_title)
        # we open the association but play the Push Model's SCP role (role selection)
        assoc = associate(self.config, peer, contexts=[build_context(PUSH_MODEL)],
                          ext_neg=[build_role(PUSH_MODEL, scp_role=True)])
        if not assoc.is_established:
            self._failed_attempt(row, refusal(peer, assoc))
            return
        try:
            if not assoc.accepted_contexts:
                self._failed_attempt(row, f"{peer.ae_title} does not accept storage commitment"
                                     " reports", permanent=True)
                return
            event_type = FAILURES_EXIST if verdict.failed else ALL_COMMITTED
            status, _ = assoc.send_n_event_report(info, event_type, PUSH_MODEL,
                                                  WELL_KNOWN_INSTANCE)
        finally:
            if assoc.is_established:
                assoc.release()
        code = int(status.Status) if "Status" in status else None
        if code is None or code_to_category(code) not in ("Success", "Warning"):
            shown = "no response" if code is None else f"status 0x{code:04X}"
            self._failed_attempt(row, f"{peer.ae_title} answered the report with {shown}")
            return
        with self.index.transaction() as db:
            # the instance list is not needed any more: a row per study stays small
            db.execute("UPDATE commitments SET state = ?, updated = ?, committed = ?,"
                       " failed = ?, error = NULL, refs = '[]' WHERE transaction_uid = ?",
                       (REPORTED, time.time(), len(verdict.committed), len(verdict.failed),
                        row["transaction_uid"]))
        log.info("commitment_reported", transaction_uid=row["transaction_uid"],
                 destination=peer.ae_title, committed=len(verdict.committed),
                 failed=len(verdict.failed))

    def _failed_attempt(self, row: Any, reason: str, permanent: bool = False) -> None:
        now = time.time()
        attempts = row["attempts"] + 1
        expired, delay = after_failure(self.config.outbox, attempts, row["created"], now,
                                       permanent)
        with self.index.transaction() as db:
            db.execute("UPDATE commitments SET state = ?, attempts = ?, next_attempt = ?,"
                       " updated = ?, error = ? WHERE transaction_uid = ? AND state = ?",
                       (FAILED if expired else PENDING, attempts, now + delay, now, reason,
                        row["transaction_uid"], PENDING))
        if expired:
            log.error("commitment_report_failed", transaction_uid=row["transaction_uid"],
                      destination=row["requester"], attempts=attempts, reason=reason)
        else:
            log.warning("commitment_report_retry", transaction_uid=row["transaction_uid"],
                        destination=row["requester"], attempts=attempts,
                        retry_in_s=round(delay, 3), reason=reason)


def summary(index: Index) -> dict[str, Any]:
    """Requests per state, and the last error of one not reported, for ``dicomnode status``."""
    states = {r["state"]: r["n"] for r in index.db.execute(
        "SELECT state, COUNT(*) AS n FROM commitments GROUP BY state")}
    last = index.db.execute("SELECT requester, error FROM commitments WHERE state != ? AND"
                            " error IS NOT NULL ORDER BY updated DESC LIMIT 1",
                            (REPORTED,)).fetchone()
    return {"states": states,
            "last_error": f"report to {last['requester']}: {last['error']}" if last else None}


def schedule(scheduler: Any, config: Config, index: Index) -> Reporter:
    """Report due requests every ``[outbox] poll_interval``."""
    reporter = Reporter(config, index)
    scheduler.add_job(reporter.dispatch, "interval", seconds=config.outbox.poll_interval,
                      id="storage-commitment", max_instances=1, coalesce=True)
    return reporter
