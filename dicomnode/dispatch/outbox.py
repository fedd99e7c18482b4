"""The outbox: durable, exactly-once delivery of harmonised series to peers by C-STORE.

One ``outbox`` row per (instance, destination) lives in the node's SQLite index, so the
queue survives restarts and ``kill -9``. A row moves

    pending --claim--> sending --Success/Warning--> sent
                          \\--failure--> pending (next_attempt = now + backoff)
                                          or failed (queued longer than max_age_hours)
    sending --crash, recover--> uncertain --peer holds it (C-FIND)--> sent
                                          \\--it does not, or cannot say--> pending

Each transition is its own committed transaction: rows are claimed (``sending``) before
the association opens, and a row is marked ``sent`` in the commit that immediately
follows the peer's Success/Warning response. A crash between the peer's response and
that commit leaves a row ``sending`` whose instance did arrive; ``recover`` therefore
makes ``sending`` rows ``uncertain``, and before sending them again the outbox asks the
destination (Study Root C-FIND, IMAGE level, by SOP Instance UID): an instance it
already holds is marked sent without a second C-STORE. That makes delivery exactly once
to a peer that answers C-FIND (Orthanc, most PACS, once they let us query); a peer that
offers no C-FIND (dcmtk's storescp) gets those instances again: at least once, logged
as ``sends_uncertain_resent``. A ``sent`` row is never sent again unless ``dicomnode
resend`` asks for it, or the instance's content changes (a re-harmonised series with
other bytes under the same UID).

Retries back off exponentially per row (:mod:`dicomnode.dispatch.retry`); a failed attempt
on a row first queued more than ``max_age_hours`` ago makes it ``failed`` with the last
error. Series states follow the rows (:mod:`dicomnode.dispatch.rollup`). The rows' SQL is
in :mod:`dicomnode.store.sends`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread

from dicomnode import metrics
from dicomnode.config import Config
from dicomnode.dispatch.retry import Retry, after_failure, log_failure
from dicomnode.dispatch.rollup import reopen, rollup
from dicomnode.errors import UserError
from dicomnode.log import get_logger
from dicomnode.net.peer import Unreachable, held_by_peer, peer_association
from dicomnode.net.status import describe, response_status, succeeded
from dicomnode.net.syntax import describe_failure, fit_to_association, store_contexts
from dicomnode.store import sends
from dicomnode.store.index import Index, SeriesState
from dicomnode.store.sends import Failure, SendState

log = get_logger("outbox")

BATCH = 200  # instances per association
# source series states that mean newer input than a derived series was made from
SUPERSEDING = (SeriesState.RECEIVING, SeriesState.QUEUED, SeriesState.PROCESSING)


# --- queueing -------------------------------------------------------------------------

def enqueue_series(index: Index, series_uid: str, destinations: Sequence[str],
                   now: float | None = None) -> int:
    """Queue every instance of ``series_uid`` for each peer AE title in ``destinations``.

    Returns the number of instance-sends queued. Idempotent: an instance already queued
    or sent with the same content is not queued again (a re-run of the same job sends
    nothing twice); one whose stored bytes changed since it was queued is queued anew.
    A derived series whose source is receiving or queued again (a late instance arrived
    while it was harmonised) is superseded: nothing is queued, the rerun will send.
    """
    now = time.time() if now is None else now
    dests = list(dict.fromkeys(d.strip() for d in destinations if d and d.strip()))
    if not dests:
        return 0
    result = sends.queue_series(index, series_uid, dests, SUPERSEDING, now)
    if result.superseded is not None:
        source_uid, source_state = result.superseded
        log.info("sends_superseded", series_uid=series_uid, source_series_uid=source_uid,
                 source_state=source_state)
        return 0
    if result.queued:
        reopen(index, [series_uid])
    elif result.instances:
        rollup(index, [series_uid])  # all sent before (a re-run): the states say so again
    log.info("sends_queued", series_uid=series_uid, destinations=dests,
             instances=result.instances, queued=result.queued)
    return result.queued


def resend(index: Index, *, series_uid: str | None = None, destination: str | None = None,
           states: Sequence[str] = (SendState.SENT, SendState.FAILED, SendState.PENDING,
                                    SendState.UNCERTAIN),
           now: float | None = None) -> int:
    """Queue rows again (explicit operator request); returns how many were re-queued."""
    now = time.time() if now is None else now
    uids, count = sends.requeue(index, states, series_uid, destination, now)
    reopen(index, uids)
    log.info("resend_requested", series_uid=series_uid, destination=destination, queued=count)
    return count


def _derived_of(index: Index, uid: str) -> list[str]:
    row = index.series(uid)
    if row is None:
        raise UserError(f"series {uid} is not in the index")
    if row["kind"] == "derived":
        return [uid]
    derived = index.derived_series(uid)
    if not derived:
        raise UserError(f"series {uid} is an original without a harmonised copy")
    return derived


def resend_series(index: Index, series_uid: str, to: str | None = None) -> int:
    """Queue one series' harmonised instances again (``dicomnode resend --series``, the
    console's resend): a derived series, or every one derived from an original; to ``to``
    only (even a peer its route never sent it to), else wherever it was queued for.
    Returns how many instance sends were queued; a UserError says why none can be."""
    total = 0
    for uid in _derived_of(index, series_uid):
        known = sends.summary(index).get(uid, {})
        if to is not None and to not in known:
            total += enqueue_series(index, uid, [to])
        elif not known:
            raise UserError(f"series {uid} has no sends; name a peer with --to")
        else:
            total += resend(index, series_uid=uid, destination=to)
    return total


def recover(index: Index, now: float | None = None) -> int:
    """After a crash: rows left 'sending' may have reached the peer unconfirmed; they
    become 'uncertain', to be checked with the peer before they are sent again."""
    return sends.mark_uncertain(index, time.time() if now is None else now)


# --- sending --------------------------------------------------------------------------

@dataclass
class Outbox:
    """Sends due outbox rows; ``dispatch`` is one pass, run by the node's scheduler."""

    config: Config
    index: Index

    def dispatch(self, now: float | None = None) -> int:
        """Try every due row once, one association per destination; returns rows tried."""
        now = time.time() if now is None else now
        tried = 0
        for dest in sends.due_destinations(self.index, now):
            self._settle(dest, now)
            while True:
                rows = sends.claim(self.index, dest, now, limit=BATCH)
                if not rows:
                    break
                tried += len(rows)
                self._send(dest, rows)
                if len(rows) < BATCH:
                    break
        return tried

    def _settle(self, dest: str, now: float) -> None:
        """Uncertain rows of ``dest``: sent if the peer holds the instance, else pending.

        While the peer cannot be reached they stay uncertain (retried with backoff, failed
        after max_age_hours like any send), so the check is not skipped by an outage.
        """
        rows = sends.claim(self.index, dest, now, SendState.UNCERTAIN)
        if not rows:
            return
        peer = self.config.peer(dest)
        if peer is None or peer.port is None:
            self._release(rows)  # the send reports what is wrong with the peer
            return
        located = sends.locate(self.index, [r["id"] for r in rows])
        try:
            held = held_by_peer(self.config, peer, [
                (r["study_uid"], r["series_uid"], r["sop_instance_uid"]) for r in located])
        except Unreachable as exc:
            self._fail_all(rows, str(exc), again=SendState.UNCERTAIN)
            return
        sends.settle(self.index, rows, held or set(), now)
        for series_uid in sorted({r["series_uid"] for r in rows}):
            mine = [r["sop_instance_uid"] for r in rows if r["series_uid"] == series_uid]
            if held is None:
                log.warning("sends_uncertain_resent", series_uid=series_uid, destination=dest,
                            instances=len(mine), reason=f"{dest} offers no C-FIND to check"
                            " what arrived before the crash: delivery is at least once")
            else:
                found = len(held.intersection(mine))
                log.info("sends_uncertain_checked", series_uid=series_uid, destination=dest,
                         instances=len(mine), already_held=found, to_send=len(mine) - found)
        rollup(self.index, {r["series_uid"] for r in rows})

    def _send(self, dest: str, rows: list[Any]) -> None:
        cfg = self.config
        node = cfg.node
        peer = cfg.peer(dest)
        info = {r["sop_instance_uid"]: self.index.instance(r["sop_instance_uid"]) for r in rows}
        missing = [r for r in rows if info[r["sop_instance_uid"]] is None]
        for r in missing:
            self._failed_attempt(r, None, "instance no longer in the index", permanent=True)
        rows = [r for r in rows if info[r["sop_instance_uid"]] is not None]
        touched = {r["series_uid"] for r in rows + missing}
        if not rows:
            rollup(self.index, touched)
            return
        if peer is None or peer.port is None:
            self._fail_all(rows, f"peer {dest} is not in [[peers]]" if peer is None
                           else f"peer {dest} has no port")
            rollup(self.index, touched)
            return
        contexts = store_contexts((i["sop_class_uid"], i["transfer_syntax"])
                                  for i in info.values() if i is not None)
        sent = 0
        try:
            with peer_association(cfg, peer, contexts, max_pdu=node.max_pdu_size) as assoc:
                for i, r in enumerate(rows):
                    if not assoc.is_established:
                        self._fail_all(rows[i:], f"association with {dest} lost")
                        break
                    try:
                        ds = dcmread(node.data_dir / info[r["sop_instance_uid"]]["path"])
                        ds = fit_to_association(ds, assoc.accepted_contexts)
                        ts = str(ds.file_meta.TransferSyntaxUID)
                        code = response_status(assoc.send_c_store(ds))
                    except Exception as exc:  # this instance only: the others still go
                        self._failed_attempt(r, None, describe_failure(exc))
                        continue
                    if succeeded(code):
                        sends.mark_sent(self.index, r["id"], code, ts)
                        metrics.sent(dest)
                        log.debug("instance_sent", sop_instance_uid=r["sop_instance_uid"],
                                  destination=dest, status=f"0x{code:04X}")
                        sent += 1
                    else:
                        self._failed_attempt(r, code, describe(code))
        except Unreachable as exc:
            log.warning("send_association_failed", destination=dest, host=peer.host,
                        port=peer.port, instances=len(rows), reason=str(exc))
            self._fail_all(rows, str(exc))
            rollup(self.index, touched)
            return
        finally:
            self._release(rows)
        log.info("sends_done", destination=dest, tried=len(rows), sent=sent,
                 series=sorted({r["series_uid"] for r in rows}))
        rollup(self.index, touched)

    def _release(self, rows: Sequence[Any]) -> None:
        """Rows of this pass still 'sending' (an error escaped the loop) go back to
        pending now, not at the next restart."""
        released = sends.release(self.index, [r["id"] for r in rows])
        if released:
            log.warning("sends_released", destination=rows[0]["destination"],
                        instances=released)

    def _fail_all(self, rows: Sequence[Any], reason: str,
                  again: SendState = SendState.PENDING) -> None:
        """One failed attempt for many rows (association failed): one commit, one log
        line per series, not one per instance. Rows to retry go back to ``again``."""
        now = time.time()
        failures: list[Failure] = []
        outcome: dict[tuple[str, bool], list[Retry]] = defaultdict(list)
        for row in rows:
            retry = after_failure(self.config.outbox, row["attempts"], row["created"], now)
            failures.append(Failure(row["id"], SendState.FAILED if retry.given_up else again,
                                    retry.at, reason))
            outcome[(row["series_uid"], retry.given_up)].append(retry)
        sends.record_failures(self.index, failures, now)
        dest = rows[0]["destination"] if rows else None
        metrics.send_failed(dest, len(rows))
        for (series_uid, _), retries in outcome.items():
            log_failure(log, retries[0], "send_failed", "send_retry_scheduled",
                        [r.delay for r in retries], series_uid=series_uid, destination=dest,
                        instances=len(retries), reason=reason)

    def _failed_attempt(self, row: Any, code: int | None, reason: str,
                        permanent: bool = False) -> None:
        now = time.time()
        retry = after_failure(self.config.outbox, row["attempts"], row["created"], now,
                              permanent)
        state = SendState.FAILED if retry.given_up else SendState.PENDING
        sends.record_failures(self.index, [Failure(row["id"], state, retry.at, reason, code)],
                              now)
        metrics.send_failed(row["destination"])
        log_failure(log, retry, "send_failed", "send_retry_scheduled",
                    sop_instance_uid=row["sop_instance_uid"], series_uid=row["series_uid"],
                    destination=row["destination"], attempts=row["attempts"], reason=reason)


def schedule(scheduler: Any, config: Config, index: Index) -> Outbox:
    """Mark rows a crash left 'sending' uncertain and dispatch every poll_interval."""
    uncertain = recover(index)
    if uncertain:
        log.info("outbox_recovered", uncertain=uncertain)
    outbox = Outbox(config, index)
    scheduler.add_job(outbox.dispatch, "interval", seconds=config.outbox.poll_interval,
                      id="outbox", max_instances=1, coalesce=True)
    return outbox
