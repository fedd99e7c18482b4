"""Storage commitment reports (PS3.4 Annex J; IHE RAD-10): the N-EVENT-REPORT that tells a
requester which of the instances it asked about the node has taken responsibility for.

A scanner or PACS that sent instances asks (N-ACTION, :mod:`dicomnode.scp.commitment`)
whether the node has taken responsibility for them, and deletes its own copies once told
so. The answer is an N-EVENT-REPORT that the node sends later, on an association it opens
to the requester: the requester's ``[[peers]]`` entry says where.

The request is committed to the index before the N-ACTION is answered Success, so a
restart never loses one; a scheduled pass reports pending requests, retrying an
unreachable requester with the outbox's back-off (:mod:`dicomnode.dispatch.retry`) and
giving up after ``max_age_hours``. An instance is committed when it is indexed under the
SOP class asked about and its file is on disk: its C-STORE was answered Success only once
both were durable. One the node does not hold yet may still be arriving on another
association, so a report with failures waits until the request is ``series_timeout``
seconds old. A crash after the peer took the report and before the node recorded it
sends the report again; the peer matches it by Transaction UID.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pynetdicom import build_context, build_role

from dicomnode.config import Config
from dicomnode.dispatch.retry import after_failure, log_failure
from dicomnode.log import get_logger
from dicomnode.net.commitment import (
    PUSH_MODEL,
    WELL_KNOWN_INSTANCE,
    Verdict,
    event_information,
)
from dicomnode.net.peer import Unreachable, peer_association
from dicomnode.net.status import (
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_SOP_INSTANCE,
    response_status,
    succeeded,
)
from dicomnode.store import commitments
from dicomnode.store.commitments import Reference
from dicomnode.store.index import Index

log = get_logger("commitment")


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


class _NotReported(Exception):
    """A report attempt that failed: why, and whether trying again can help."""

    def __init__(self, reason: str, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent


@dataclass
class Reporter:
    """Reports due requests; ``dispatch`` is one pass, run by the node's scheduler."""

    config: Config
    index: Index

    def dispatch(self, now: float | None = None) -> int:
        """Try every due request once; returns how many were tried."""
        now = time.time() if now is None else now
        rows = commitments.due(self.index, now)
        for row in rows:
            try:
                self._report(row, now)
            except _NotReported as exc:
                self._failed_attempt(row, str(exc), exc.permanent)
            except Exception as exc:  # any failure is retried; logged by type
                self._failed_attempt(row, type(exc).__name__)
        return len(rows)

    def _report(self, row: Any, now: float) -> None:
        peer = self.config.peer(row["requester"])
        if peer is None or peer.port is None:  # the config changed since the request
            raise _NotReported(f"no [[peers]] port for {row['requester']}", permanent=True)
        verdict = judge(self.config, self.index, commitments.references(row))
        if verdict.failed and now - row["created"] < self.config.node.series_timeout:
            return  # may still be arriving on another association: ask again next pass
        info = event_information(row["transaction_uid"], verdict, self.config.node.ae_title)
        # we open the association but play the Push Model's SCP role (role selection)
        try:
            with peer_association(self.config, peer, [build_context(PUSH_MODEL)],
                                  ext_neg=[build_role(PUSH_MODEL, scp_role=True)]) as assoc:
                if not assoc.accepted_contexts:
                    raise _NotReported(f"{peer.ae_title} does not accept storage commitment"
                                       " reports", permanent=True)
                status, _ = assoc.send_n_event_report(info, verdict.event_type, PUSH_MODEL,
                                                      WELL_KNOWN_INSTANCE)
        except Unreachable as exc:
            raise _NotReported(str(exc)) from None
        code = response_status(status)
        if not succeeded(code):
            shown = "no response" if code is None else f"status 0x{code:04X}"
            raise _NotReported(f"{peer.ae_title} answered the report with {shown}")
        commitments.mark_reported(self.index, row["transaction_uid"], len(verdict.committed),
                                  len(verdict.failed))
        log.info("commitment_reported", transaction_uid=row["transaction_uid"],
                 destination=peer.ae_title, committed=len(verdict.committed),
                 failed=len(verdict.failed))

    def _failed_attempt(self, row: Any, reason: str, permanent: bool = False) -> None:
        attempts = row["attempts"] + 1
        now = time.time()
        retry = after_failure(self.config.outbox, attempts, row["created"], now, permanent)
        commitments.record_failure(self.index, row["transaction_uid"], attempts,
                                   retry.given_up, retry.at, reason, now)
        log_failure(log, retry, "commitment_report_failed", "commitment_report_retry",
                    transaction_uid=row["transaction_uid"], destination=row["requester"],
                    attempts=attempts, reason=reason)


def schedule(scheduler: Any, config: Config, index: Index) -> Reporter:
    """Report due requests every ``[outbox] poll_interval``."""
    reporter = Reporter(config, index)
    scheduler.add_job(reporter.dispatch, "interval", seconds=config.outbox.poll_interval,
                      id="storage-commitment", max_instances=1, coalesce=True)
    return reporter
