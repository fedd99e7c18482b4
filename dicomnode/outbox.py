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

Retries back off exponentially per row: ``retry_initial * 2**(attempts-1)`` seconds,
capped at ``retry_max_interval``; a failed attempt on a row first queued more than
``max_age_hours`` ago makes it ``failed`` with the last error. Series states follow the
rows: when every row of a derived series is ``sent`` the derived series and its source
become ``sent``; when rows are ``failed`` and none is left to try, both become ``failed``
with the error.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import build_context
from pynetdicom.status import code_to_category

from dicomnode import index as ix
from dicomnode.client import Unreachable, associate, held_by_peer, refusal
from dicomnode.config import Config, OutboxSettings
from dicomnode.index import Index
from dicomnode.log import get_logger

log = get_logger("outbox")

PENDING, SENDING, UNCERTAIN = "pending", "sending", "uncertain"
SENT, FAILED = "sent", "failed"
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
SEND_ERROR_PREFIX = "send to "
BATCH = 200  # instances per association
# source series states that mean newer input than a derived series was made from
SUPERSEDING = (ix.RECEIVING, ix.QUEUED, ix.PROCESSING)
MAX_CONTEXTS = 128  # presentation contexts one association may propose


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
    queued = 0
    with index.transaction() as db:
        source = db.execute("SELECT s.series_uid, s.state FROM series d JOIN series s ON"
                            " s.series_uid = d.source_series_uid WHERE d.series_uid = ?",
                            (series_uid,)).fetchone()
        if source is not None and source["state"] in SUPERSEDING:
            log.info("sends_superseded", series_uid=series_uid,
                     source_series_uid=source["series_uid"], source_state=source["state"])
            return 0
        rows = db.execute("SELECT sop_instance_uid, sha256 FROM instances WHERE series_uid = ?",
                          (series_uid,)).fetchall()
        for row in rows:
            for dest in dests:
                old = db.execute("SELECT state, sha256 FROM outbox WHERE sop_instance_uid = ?"
                                 " AND destination = ?",
                                 (row["sop_instance_uid"], dest)).fetchone()
                if old is None:
                    db.execute(
                        "INSERT INTO outbox (sop_instance_uid, series_uid, destination, sha256,"
                        " state, created, next_attempt, updated) VALUES (?,?,?,?,?,?,?,?)",
                        (row["sop_instance_uid"], series_uid, dest, row["sha256"], PENDING,
                         now, now, now))
                    queued += 1
                elif old["sha256"] != row["sha256"] or old["state"] == FAILED:
                    _requeue(db, "sop_instance_uid = ? AND destination = ?",
                             (row["sop_instance_uid"], dest), now, sha256=row["sha256"])
                    queued += 1
    if queued:
        _reopen_series(index, [series_uid])
    elif rows:
        rollup(index, [series_uid])  # all sent before (a re-run): the states say so again
    log.info("sends_queued", series_uid=series_uid, destinations=dests, instances=len(rows),
             queued=queued)
    return queued


def _requeue(db: Any, where: str, args: tuple[Any, ...], now: float,
             sha256: str | None = None) -> int:
    sets = "state = ?, attempts = 0, created = ?, next_attempt = ?, updated = ?, error = NULL," \
           " status = NULL, sent_at = NULL"
    values: list[Any] = [PENDING, now, now, now]
    if sha256 is not None:
        sets += ", sha256 = ?"
        values.append(sha256)
    return db.execute(f"UPDATE outbox SET {sets} WHERE {where}", (*values, *args)).rowcount


def _reopen_series(index: Index, series_uids: Iterable[str]) -> None:
    """A series with sends to do again is 'archived' (derived) / 'harmonised' (source)."""
    for uid in series_uids:
        index.set_series_state(uid, ix.ARCHIVED, only_if=[ix.SENT, ix.FAILED], error=None)
        src = index.series(uid)
        if src is not None and src["source_series_uid"]:
            _source_state(index, src["source_series_uid"], ix.HARMONISED, None)


def _source_state(index: Index, uid: str, state: str, error: str | None) -> None:
    row = index.series(uid)
    if row is None:
        return
    # a source that failed for another reason (e.g. its harmonisation) keeps that reason
    if row["state"] == ix.FAILED and not (row["error"] or "").startswith(SEND_ERROR_PREFIX):
        return
    index.set_series_state(uid, state, only_if=[ix.HARMONISED, ix.SENT, ix.FAILED], error=error)


def resend(index: Index, *, series_uid: str | None = None, destination: str | None = None,
           states: Sequence[str] = (SENT, FAILED, PENDING, UNCERTAIN),
           now: float | None = None) -> int:
    """Queue rows again (explicit operator request); returns how many were re-queued."""
    now = time.time() if now is None else now
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
        count = _requeue(db, clause, tuple(args), now)
    _reopen_series(index, uids)
    log.info("resend_requested", series_uid=series_uid, destination=destination, queued=count)
    return count


def recover(index: Index, now: float | None = None) -> int:
    """After a crash: rows left 'sending' may have reached the peer unconfirmed; they
    become 'uncertain', to be checked with the peer before they are sent again."""
    now = time.time() if now is None else now
    with index.transaction() as db:
        return db.execute("UPDATE outbox SET state = ?, next_attempt = ?, updated = ?"
                          " WHERE state = ?", (UNCERTAIN, now, now, SENDING)).rowcount


def summary(index: Index) -> dict[str, dict[str, dict[str, int]]]:
    """``{series_uid: {destination: {state: count}}}`` for ``dicomnode status``."""
    out: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    for r in index.db.execute("SELECT series_uid, destination, state, COUNT(*) AS n FROM outbox"
                              " GROUP BY series_uid, destination, state"):
        out[r["series_uid"]][r["destination"]][r["state"]] = r["n"]
    return {k: dict(v) for k, v in out.items()}


def last_errors(index: Index) -> dict[str, str]:
    """The most recent send error of each series that has one."""
    rows = index.db.execute("SELECT series_uid, destination, error FROM outbox WHERE error IS"
                            " NOT NULL AND state != ? ORDER BY updated", (SENT,))
    return {r["series_uid"]: f"{SEND_ERROR_PREFIX}{r['destination']}: {r['error']}"
            for r in rows}


# --- sending --------------------------------------------------------------------------

def backoff(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
    return min(maximum, initial * 2 ** max(0, min(attempts - 1, 60)))


def after_failure(settings: OutboxSettings, attempts: int, created: float, now: float,
                  permanent: bool = False) -> tuple[bool, float]:
    """Whether a failed delivery first queued at ``created`` is given up (``permanent``,
    or older than ``max_age_hours``), and the back-off before its next attempt."""
    expired = permanent or now - created >= settings.max_age_hours * 3600
    return expired, backoff(attempts, settings.retry_initial, settings.retry_max_interval)


def store_contexts(items: Iterable[tuple[str, str]]) -> list[Any]:
    """Presentation contexts for (SOP class, stored transfer syntax) pairs.

    Each SOP class gets one uncompressed context; a class stored compressed also gets a
    context offering exactly its stored syntax, so a peer that accepts it receives the
    bytes as stored and one that does not gets them decompressed.
    """
    classes: dict[str, set[str]] = defaultdict(set)
    for sop_class, ts in items:
        classes[sop_class].add(ts)
    contexts = []
    for sop_class, syntaxes in classes.items():
        for ts in sorted(syntaxes):
            if UID(ts).is_compressed:
                contexts.append(build_context(sop_class, [ts]))
        contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
    return contexts[:MAX_CONTEXTS]


class NotSendable(ValueError):
    """The peer cannot take this instance over the negotiated contexts (message: UIDs)."""


def fit_to_association(ds: Dataset, accepted: Sequence[Any], role: str = "scu") -> Dataset:
    """Make ``ds`` sendable over one of the ``accepted`` contexts, decompressing if needed.

    Raises :class:`NotSendable` when the peer accepted no context that can carry it.
    """
    sop_class = str(ds.SOPClassUID)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    usable = [cx for cx in accepted if cx.abstract_syntax == sop_class
              and (cx.as_scu if role == "scu" else cx.as_scp)]
    if not usable:
        raise NotSendable(f"peer accepted no presentation context for SOP class {sop_class}")
    syntaxes = {UID(cx.transfer_syntax[0]) for cx in usable}
    if ts in syntaxes or (not ts.is_compressed and any(not s.is_compressed for s in syntaxes)):
        return ds
    if any(not s.is_compressed for s in syntaxes) and ts.is_compressed:
        # -> Explicit VR Little Endian; same instance (pydicom would mint a new UID)
        ds.decompress(generate_instance_uid=False)
        return ds
    raise NotSendable(f"peer accepted SOP class {sop_class} only in"
                     f" {sorted(map(str, syntaxes))}, instance is {ts}")


def describe_failure(exc: Exception) -> str:
    """What a failed send or retrieve of one instance records and logs.

    Our own reasons in full, a file system error with its cause and file, anything else
    (an unreadable file, a codec failure) by its type only: library messages can quote
    element bytes, and with them a patient's name.
    """
    if isinstance(exc, NotSendable):
        return str(exc)
    if isinstance(exc, OSError):
        return " ".join(str(p) for p in (f"{type(exc).__name__}:", exc.strerror or exc.errno,
                                         exc.filename) if p)
    return type(exc).__name__


@dataclass
class Outbox:
    """Sends due outbox rows; ``dispatch`` is one pass, run by the node's scheduler."""

    config: Config
    index: Index

    def dispatch(self, now: float | None = None) -> int:
        """Try every due row once, one association per destination; returns rows tried."""
        now = time.time() if now is None else now
        dests = [r["destination"] for r in self.index.db.execute(
            "SELECT DISTINCT destination FROM outbox WHERE state IN (?, ?)"
            " AND next_attempt <= ?", (PENDING, UNCERTAIN, now))]
        tried = 0
        for dest in dests:
            self._settle(dest, now)
            while True:
                rows = self._claim(dest, now)
                if not rows:
                    break
                tried += len(rows)
                self._send(dest, rows)
                if len(rows) < BATCH:
                    break
        return tried

    def _claim(self, dest: str, now: float, state: str = PENDING,
               limit: int = BATCH) -> list[Any]:
        with self.index.transaction() as db:
            return db.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, updated = ? WHERE id IN"
                " (SELECT id FROM outbox WHERE destination = ? AND state = ? AND next_attempt"
                " <= ? ORDER BY id LIMIT ?) RETURNING *",
                (SENDING, now, dest, state, now, limit)).fetchall()

    def _settle(self, dest: str, now: float) -> None:
        """Uncertain rows of ``dest``: sent if the peer holds the instance, else pending.

        While the peer cannot be reached they stay uncertain (retried with backoff, failed
        after max_age_hours like any send), so the check is not skipped by an outage.
        """
        rows = self._claim(dest, now, UNCERTAIN, limit=-1)
        if not rows:
            return
        peer = self.config.peer(dest)
        if peer is None or peer.port is None:
            self._release(rows)  # the send reports what is wrong with the peer
            return
        ids = [r["id"] for r in rows]
        located = self.index.db.execute(
            "SELECT i.sop_instance_uid, i.series_uid, s.study_uid FROM outbox o JOIN instances"
            " i USING (sop_instance_uid) JOIN series s ON s.series_uid = i.series_uid"
            f" WHERE o.id IN ({', '.join('?' * len(ids))})", ids).fetchall()
        try:
            held = held_by_peer(self.config, peer, [
                (r["study_uid"], r["series_uid"], r["sop_instance_uid"]) for r in located])
        except Unreachable as exc:
            self._fail_all(rows, str(exc), again=UNCERTAIN)
            return
        stamp = time.time()
        with self.index.transaction() as db:
            for r in rows:
                if held and r["sop_instance_uid"] in held:
                    db.execute("UPDATE outbox SET state = ?, sent_at = ?, updated = ?,"
                               " error = NULL WHERE id = ?", (SENT, stamp, stamp, r["id"]))
                else:  # due in this same pass
                    db.execute("UPDATE outbox SET state = ?, next_attempt = ?, updated = ?"
                               " WHERE id = ?", (PENDING, now, stamp, r["id"]))
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
        if not rows:
            rollup(self.index, {r["series_uid"] for r in missing})
            return
        if peer is None or peer.port is None:
            reason = (f"peer {dest} is not in [[peers]]" if peer is None
                      else f"peer {dest} has no port")
            self._fail_all(rows, reason)
            rollup(self.index, {r["series_uid"] for r in rows + missing})
            return
        contexts = store_contexts((i["sop_class_uid"], i["transfer_syntax"])
                                  for i in info.values() if i is not None)
        assoc = associate(cfg, peer, contexts=contexts, max_pdu=node.max_pdu_size)
        if not assoc.is_established:
            reason = refusal(peer, assoc)
            log.warning("send_association_failed", destination=dest, host=peer.host,
                        port=peer.port, instances=len(rows), reason=reason)
            self._fail_all(rows, reason)
            rollup(self.index, {r["series_uid"] for r in rows + missing})
            return
        sent = 0
        try:
            for i, r in enumerate(rows):
                if not assoc.is_established:
                    self._fail_all(rows[i:], f"association with {dest} lost")
                    break
                rec = info[r["sop_instance_uid"]]
                try:
                    ds = dcmread(node.data_dir / rec["path"])
                    ds = fit_to_association(ds, assoc.accepted_contexts)
                    ts = str(ds.file_meta.TransferSyntaxUID)
                    rsp = assoc.send_c_store(ds)
                except Exception as exc:  # this instance only: the others still go
                    self._failed_attempt(r, None, describe_failure(exc))
                    continue
                code = int(rsp.Status) if "Status" in rsp else None
                category = code_to_category(code) if code is not None else None
                if category in ("Success", "Warning"):
                    self._mark_sent(r, code, ts)
                    sent += 1
                else:
                    reason = (f"status 0x{code:04X} ({category})" if code is not None
                              else "no response (timeout or abort)")
                    self._failed_attempt(r, code, reason)
        finally:
            if assoc.is_established:
                assoc.release()
            self._release(rows)
        log.info("sends_done", destination=dest, tried=len(rows), sent=sent,
                 series=sorted({r["series_uid"] for r in rows}))
        rollup(self.index, {r["series_uid"] for r in rows + missing})

    def _release(self, rows: Sequence[Any]) -> None:
        """Rows of this pass still 'sending' (an error escaped the loop) go back to
        pending now, not at the next restart."""
        now = time.time()
        with self.index.transaction() as db:
            released = sum(db.execute("UPDATE outbox SET state = ?, next_attempt = ?,"
                                      " updated = ? WHERE id = ? AND state = ?",
                                      (PENDING, now, now, r["id"], SENDING)).rowcount
                           for r in rows)
        if released:
            log.warning("sends_released", destination=rows[0]["destination"],
                        instances=released)

    def _mark_sent(self, row: Any, code: int, ts: str) -> None:
        now = time.time()
        with self.index.transaction() as db:
            db.execute("UPDATE outbox SET state = ?, sent_at = ?, updated = ?, status = ?,"
                       " transfer_syntax = ?, error = NULL WHERE id = ? AND state = ?",
                       (SENT, now, now, code, ts, row["id"], SENDING))
        log.debug("instance_sent", sop_instance_uid=row["sop_instance_uid"],
                  destination=row["destination"], status=f"0x{code:04X}")

    def _fail_all(self, rows: Sequence[Any], reason: str, again: str = PENDING) -> None:
        """One failed attempt for many rows (association failed): one commit, one log
        line per series, not one per instance. Rows to retry go back to ``again``."""
        now = time.time()
        outcome: dict[tuple[str, bool], list[float]] = defaultdict(list)
        with self.index.transaction() as db:
            for row in rows:
                expired, delay = after_failure(self.config.outbox, row["attempts"],
                                               row["created"], now)
                db.execute("UPDATE outbox SET state = ?, next_attempt = ?, updated = ?,"
                           " status = NULL, error = ? WHERE id = ? AND state = ?",
                           (FAILED if expired else again, now + delay, now, reason,
                            row["id"], SENDING))
                outcome[(row["series_uid"], expired)].append(delay)
        dest = rows[0]["destination"] if rows else None
        for (series_uid, expired), delays in outcome.items():
            if expired:
                log.error("send_failed", series_uid=series_uid, destination=dest,
                          instances=len(delays), reason=reason)
            else:
                log.warning("send_retry_scheduled", series_uid=series_uid, destination=dest,
                            instances=len(delays), retry_in_s=round(min(delays), 3),
                            reason=reason)

    def _failed_attempt(self, row: Any, code: int | None, reason: str,
                        permanent: bool = False) -> None:
        now = time.time()
        expired, delay = after_failure(self.config.outbox, row["attempts"], row["created"],
                                       now, permanent)
        with self.index.transaction() as db:
            db.execute("UPDATE outbox SET state = ?, next_attempt = ?, updated = ?, status = ?,"
                       " error = ? WHERE id = ? AND state = ?",
                       (FAILED if expired else PENDING, now + delay, now, code, reason,
                        row["id"], SENDING))
        if expired:
            log.error("send_failed", sop_instance_uid=row["sop_instance_uid"],
                      series_uid=row["series_uid"], destination=row["destination"],
                      attempts=row["attempts"], reason=reason)
        else:
            log.warning("send_retry_scheduled", sop_instance_uid=row["sop_instance_uid"],
                        series_uid=row["series_uid"], destination=row["destination"],
                        attempts=row["attempts"], retry_in_s=round(delay, 3), reason=reason)


def rollup(index: Index, series_uids: Iterable[str]) -> None:
    """Series state from its rows: all sent -> sent; failed and nothing left -> failed."""
    for uid in series_uids:
        counts = {r["state"]: r["n"] for r in index.db.execute(
            "SELECT state, COUNT(*) AS n FROM outbox WHERE series_uid = ? GROUP BY state",
            (uid,))}
        if not counts or counts.get(PENDING) or counts.get(SENDING) or counts.get(UNCERTAIN):
            continue
        series = index.series(uid)
        if series is None:
            continue
        if counts.get(FAILED):
            last = index.db.execute("SELECT destination, error FROM outbox WHERE series_uid = ?"
                                    " AND state = ? ORDER BY updated DESC LIMIT 1",
                                    (uid, FAILED)).fetchone()
            error = f"{SEND_ERROR_PREFIX}{last['destination']}: {last['error']}"
            state = ix.FAILED
        else:
            error, state = None, ix.SENT
        if index.set_series_state(uid, state, only_if=[ix.ARCHIVED, ix.SENT, ix.FAILED],
                                  error=error):
            log.info(f"series_{state}", series_uid=uid, instances=sum(counts.values()),
                     error=error)
        if series["source_series_uid"]:
            _source_state(index, series["source_series_uid"], state, error)


def schedule(scheduler: Any, config: Config, index: Index) -> Outbox:
    """Mark rows a crash left 'sending' uncertain and dispatch every poll_interval."""
    uncertain = recover(index)
    if uncertain:
        log.info("outbox_recovered", uncertain=uncertain)
    outbox = Outbox(config, index)
    scheduler.add_job(outbox.dispatch, "interval", seconds=config.outbox.poll_interval,
                      id="outbox", max_instances=1, coalesce=True)
    return outbox
