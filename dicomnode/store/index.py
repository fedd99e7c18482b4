"""The node's index: instances, series state and the persistent job queue, in SQLite.

All SQL on the index lives in this folder: here (schema, instances, series, jobs),
``sends`` (the outbox table), ``commitments``, ``lookup`` (query/retrieve) and ``archive``.

SQLite in WAL mode with ``synchronous=FULL``: a committed transaction survives a power
cut, readers never block the writer, and every state change that matters (instance
indexed, series completed + job queued, job claimed / finished) is one transaction.
Each thread gets its own connection.

The C-STORE handlers index received instances through an ``Index`` opened with
``durable=False`` (``synchronous=NORMAL``): their commits survive the process dying
(``kill -9``) but not a power cut. What makes such an instance durable is its file,
fsynced and renamed into the spool before Success; after a power cut, start-up
reconciliation (:func:`dicomnode.store.recovery.reconcile`) indexes every spool file the
index lost, so no acknowledged instance is lost and the WAL's fsync leaves the critical
path.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicomnode.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid      TEXT PRIMARY KEY,
    study_uid       TEXT NOT NULL,
    kind            TEXT NOT NULL DEFAULT 'original',  -- original | derived
    state           TEXT NOT NULL,
    instances       INTEGER NOT NULL DEFAULT 0,
    modality        TEXT,
    first_received  REAL NOT NULL,
    last_received   REAL NOT NULL,
    completed_at    REAL,
    route           TEXT,
    model           TEXT,
    source_series_uid TEXT,
    error           TEXT,
    updated_at      REAL NOT NULL,
    note            TEXT                 -- what was received as is but is not conformant
);
CREATE INDEX IF NOT EXISTS series_state ON series(state, last_received);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);

CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid       TEXT NOT NULL REFERENCES series(series_uid),
    sop_class_uid    TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    path             TEXT NOT NULL,      -- relative to data_dir
    size             INTEGER NOT NULL,
    sha256           TEXT NOT NULL,
    instance_number  INTEGER,
    received_at      REAL NOT NULL,
    attrs            TEXT NOT NULL       -- JSON: keywords for query/retrieve
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);

CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid  TEXT NOT NULL,
    kind        TEXT NOT NULL,           -- harmonise
    state       TEXT NOT NULL,           -- queued | running | done | failed | cancelled
    attempts    INTEGER NOT NULL DEFAULT 0,
    created     REAL NOT NULL,
    updated     REAL NOT NULL,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);

-- Outbox (dicomnode.store.sends): one row per (instance, destination) to deliver by C-STORE.
CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    destination      TEXT NOT NULL,      -- peer AE title
    sha256           TEXT NOT NULL,      -- content that was queued (a change re-queues)
    state            TEXT NOT NULL,      -- pending | sending | sent | failed
    attempts         INTEGER NOT NULL DEFAULT 0,
    created          REAL NOT NULL,      -- first queued: max_age_hours counts from here
    next_attempt     REAL NOT NULL,
    updated          REAL NOT NULL,
    sent_at          REAL,
    status           INTEGER,            -- last DIMSE status from the peer
    transfer_syntax  TEXT,               -- what it went out as
    error            TEXT,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt);
CREATE INDEX IF NOT EXISTS outbox_series ON outbox(series_uid, destination);

-- Storage commitment requests (dicomnode.store.commitments), until reported to the requester.
CREATE TABLE IF NOT EXISTS commitments (
    transaction_uid  TEXT PRIMARY KEY,
    requester        TEXT NOT NULL,      -- calling AE title: its [[peers]] entry gets the report
    refs             TEXT NOT NULL,      -- JSON [[class UID, instance UID], ...]; [] once reported
    state            TEXT NOT NULL,      -- pending | reported | failed
    attempts         INTEGER NOT NULL DEFAULT 0,
    created          REAL NOT NULL,      -- max_age_hours counts from here
    next_attempt     REAL NOT NULL,
    updated          REAL NOT NULL,
    committed        INTEGER,            -- instances reported committed, and failed
    failed           INTEGER,
    error            TEXT
);
CREATE INDEX IF NOT EXISTS commitments_due ON commitments(state, next_attempt);

-- Pages of series newest first, by any one filter (dicomnode.store.browse: the web
-- console), and Q/R's series in the order received (dicomnode.store.lookup: QIDO-RS stops
-- at its limit); the latest errors; each peer's last and recent sends.
CREATE INDEX IF NOT EXISTS series_received ON series(first_received);
CREATE INDEX IF NOT EXISTS series_state_received ON series(state, first_received);
CREATE INDEX IF NOT EXISTS series_route ON series(route, first_received);
CREATE INDEX IF NOT EXISTS series_modality ON series(modality, first_received);
CREATE INDEX IF NOT EXISTS series_errors ON series(updated_at) WHERE error IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_sent ON outbox(destination, sent_at) WHERE state = 'sent';
"""
# The attributes queries commonly match on (QIDO-RS, C-FIND; OHIF's study list), indexed
# by expression over every instance's attrs: dicomnode.store.prefilter narrows a query to
# the series whose instances could match, and an older index gains these when opened.
# Person names are indexed folded to lower case (ASCII, and the four other characters
# Python's case-insensitive matching equates with an ASCII letter).
QUERY_ATTRS = {"StudyDate": "DA", "AccessionNumber": "SH", "PatientID": "LO",
               "PatientName": "PN", "Modality": "CS"}
# Python str.isspace() characters: a value starting with one is stripped before matching
_SPACES = (9, 10, 11, 12, 13, 28, 29, 30, 31, 32, 133, 160, 5760, *range(8192, 8203), 8232,
           8233, 8239, 8287, 12288)


def attr_expr(keyword: str) -> str:
    """The indexed SQL expression of one of QUERY_ATTRS over ``instances.attrs``."""
    value = f"json_extract(attrs, '$.{keyword}')"
    if QUERY_ATTRS[keyword] == "PN":
        for char, letter in ((304, "i"), (305, "i"), (383, "s"), (8490, "k")):
            value = f"replace({value}, char({char}), '{letter}')"
        value = f"lower({value})"
    return value


def irregular_expr() -> str:
    """True for an instance with a QUERY_ATTRS value that :func:`attr_expr` does not order
    as matching compares it: not a string, several values, a leading space, a date that is
    not eight digits. Few instances have one; every query takes them as candidates."""
    terms = []
    for keyword, vr in QUERY_ATTRS.items():
        value = f"json_extract(attrs, '$.{keyword}')"
        terms.append(f"json_type(attrs, '$.{keyword}') NOT IN ('text', 'null')")
        if vr == "DA":
            terms.append(f"{value} NOT GLOB '{'[0-9]' * 8}'")
        else:
            terms.append(f"instr({value}, char(92)) > 0")
            terms.append(f"unicode({value}) IN ({', '.join(map(str, _SPACES))})")
    return " OR ".join(terms)


QUERY_INDEXES = "".join(
    f"CREATE INDEX IF NOT EXISTS instances_{keyword.lower()} ON instances"
    f"({attr_expr(keyword)}, series_uid);\n" for keyword in QUERY_ATTRS) + (
    "CREATE INDEX IF NOT EXISTS instances_irregular ON instances(series_uid)"
    f" WHERE {irregular_expr()};\n")

# Columns added since the first release: an older index gains them when opened.
ADDED_COLUMNS = (("series", "note", "TEXT"),
                 # the cluster (dicomnode.cluster): who ran a job, with which model version,
                 # and a training job's arguments (JSON)
                 ("jobs", "worker", "TEXT"), ("jobs", "model", "TEXT"), ("jobs", "args", "TEXT"))


class SeriesState(StrEnum):
    """A series' state, in the order a series normally moves through them (derived series
    start ``archived``)."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    HARMONISED = "harmonised"
    UNMATCHED = "unmatched"
    IGNORED = "ignored"
    SENT = "sent"
    ARCHIVED = "archived"
    FAILED = "failed"


class JobState(StrEnum):
    """A job's state: queued -> running (the embedded worker) or dispatched (handed to the
    cluster's broker) -> done | failed; a queued job of a series re-opened by a new
    instance is cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    DISPATCHED = "dispatched"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_JOBS = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps of one stored instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    modality: str | None
    instance_number: int | None
    attrs: dict[str, Any]
    notes: tuple[str, ...] = ()  # conformance problems it was stored with regardless


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    kind: str
    attempts: int
    created: float          # when it was queued: the processing time its output records,
                            # so a re-run after a crash writes the same bytes


class Index:
    """Thread-safe access to the node's SQLite index."""

    def __init__(self, path: Path, durable: bool = True) -> None:
        self.path = path
        self.synchronous = "FULL" if durable else "NORMAL"
        self._local = threading.local()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db.executescript(SCHEMA)
            self._add_columns()
            self.db.executescript(QUERY_INDEXES)
        except OSError as exc:
            raise UserError(f"cannot use {path.parent}: {exc.strerror or exc}") from None
        except sqlite3.DatabaseError as exc:  # e.g. "file is not a database"
            self.close()
            raise UserError(f"{path} is not a usable index database: {exc}") from None

    def _add_columns(self) -> None:
        for table, column, kind in ADDED_COLUMNS:
            have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                             check_same_thread=True)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and sync it: every commit so far, those of
        ``durable=False`` connections too, survives a power cut from here on."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken eagerly so concurrent writers queue, not deadlock."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- instances -------------------------------------------------------------------

    def instance(self, sop_instance_uid: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM instances WHERE sop_instance_uid = ?",
                               (sop_instance_uid,)).fetchone()

    def add_instance(self, rec: InstanceRecord, rel_path: str, size: int, sha256: str,
                     kind: str = "original", now: float | None = None) -> bool:
        """Index a stored instance (insert or replace); returns True if the series re-opened.

        A new or replaced instance of a series that had already completed re-opens it:
        it will complete again after the quiet period and be processed once more. A job
        still queued for it is cancelled in the same transaction, so the partial series
        is never processed.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            old = db.execute("SELECT series_uid FROM instances WHERE sop_instance_uid = ?",
                             (rec.sop_instance_uid,)).fetchone()
            series = db.execute("SELECT state FROM series WHERE series_uid = ?",
                                (rec.series_uid,)).fetchone()
            state = SeriesState.RECEIVING if kind == "original" else SeriesState.ARCHIVED
            note = "; ".join(rec.notes) or None
            if series is None:
                db.execute(
                    "INSERT INTO series (series_uid, study_uid, kind, state, modality,"
                    " first_received, last_received, updated_at, note)"
                    " VALUES (?,?,?,?,?,?,?,?,?)",
                    (rec.series_uid, rec.study_uid, kind, state, rec.modality, now, now, now,
                     note))
            else:
                db.execute("UPDATE series SET state = ?, last_received = ?, updated_at = ?,"
                           " error = CASE WHEN ? = 'receiving' THEN NULL ELSE error END,"
                           " note = COALESCE(?, note) WHERE series_uid = ?",
                           (state, now, now, state, note, rec.series_uid))
                db.execute("UPDATE jobs SET state = ?, updated = ?, error = ?"
                           " WHERE series_uid = ? AND state = ?",
                           (JobState.CANCELLED, now, "series re-opened by a new instance",
                            rec.series_uid, JobState.QUEUED))
            db.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, series_uid, sop_class_uid,"
                " transfer_syntax, path, size, sha256, instance_number, received_at, attrs)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (rec.sop_instance_uid, rec.series_uid, rec.sop_class_uid, rec.transfer_syntax,
                 rel_path, size, sha256, rec.instance_number, now,
                 json.dumps(rec.attrs, default=str)))
            for uid in {rec.series_uid, old["series_uid"] if old else rec.series_uid}:
                db.execute("UPDATE series SET instances = (SELECT COUNT(*) FROM instances"
                           " WHERE series_uid = ?) WHERE series_uid = ?", (uid, uid))
        return series is not None and series["state"] not in (SeriesState.RECEIVING,
                                                               SeriesState.ARCHIVED)

    def series_files(self, series_uid: str) -> list[str]:
        """Relative paths of a series' instances, in instance-number order."""
        rows = self.db.execute("SELECT path FROM instances WHERE series_uid = ?"
                               " ORDER BY instance_number, sop_instance_uid", (series_uid,))
        return [r["path"] for r in rows]

    def known_paths(self) -> set[str]:
        return {r["path"] for r in self.db.execute("SELECT path FROM instances")}

    # --- series ----------------------------------------------------------------------

    def series(self, series_uid: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM series WHERE series_uid = ?",
                               (series_uid,)).fetchone()

    def all_series(self, kind: str | None = None) -> list[sqlite3.Row]:
        sql, args = "SELECT * FROM series", ()
        if kind:
            sql, args = sql + " WHERE kind = ?", (kind,)
        return self.db.execute(sql + " ORDER BY first_received", args).fetchall()

    def derived_series(self, source_series_uid: str) -> list[str]:
        """The UIDs of the series derived from ``source_series_uid``."""
        return [r["series_uid"] for r in self.db.execute(
            "SELECT series_uid FROM series WHERE kind = 'derived' AND source_series_uid = ?",
            (source_series_uid,))]

    def complete_quiet_series(self, quiet_for: float, now: float | None = None) -> list[
            tuple[str, int]]:
        """Series silent for ``quiet_for`` seconds become complete and get a queued job."""
        now = time.time() if now is None else now
        done = []
        cutoff = now - quiet_for
        candidates = self.db.execute("SELECT series_uid FROM series WHERE state = ?"
                                     " AND last_received <= ?",
                                     (SeriesState.RECEIVING, cutoff)).fetchall()
        for row in candidates:
            with self.transaction() as db:
                changed = db.execute(
                    "UPDATE series SET state = ?, completed_at = ?, updated_at = ?"
                    " WHERE series_uid = ? AND state = ? AND last_received <= ?",
                    (SeriesState.QUEUED, now, now, row["series_uid"], SeriesState.RECEIVING,
                     cutoff)).rowcount
                if not changed:
                    continue
                db.execute("INSERT INTO jobs (series_uid, kind, state, created, updated)"
                           " SELECT ?, 'harmonise', ?, ?, ? WHERE NOT EXISTS"
                           " (SELECT 1 FROM jobs WHERE series_uid = ? AND state = ?)",
                           (row["series_uid"], JobState.QUEUED, now, now, row["series_uid"],
                            JobState.QUEUED))
                count = db.execute("SELECT instances FROM series WHERE series_uid = ?",
                                   (row["series_uid"],)).fetchone()["instances"]
            done.append((row["series_uid"], count))
        return done

    def reprocess(self, series_uid: str, now: float | None = None) -> str | None:
        """Queue a new harmonisation job for an original series that is not being received
        or processed; None when queued, else why not. The job is a new one (attempts from
        zero); its output has the same UIDs as any earlier run's."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            row = db.execute("SELECT kind, state, instances FROM series WHERE series_uid = ?",
                             (series_uid,)).fetchone()
            if row is None:
                return "is not in the index"
            if row["kind"] != "original":
                return "is a harmonised series: reprocess the original it came from"
            if row["state"] in (SeriesState.RECEIVING, SeriesState.QUEUED,
                                SeriesState.PROCESSING):
                return f"is {row['state']} already"
            if not row["instances"]:
                return "has no instances left (purged)"
            db.execute("UPDATE series SET state = ?, completed_at = ?, updated_at = ?,"
                       " error = NULL WHERE series_uid = ?",
                       (SeriesState.QUEUED, now, now, series_uid))
            db.execute("INSERT INTO jobs (series_uid, kind, state, created, updated)"
                       " VALUES (?, 'harmonise', ?, ?, ?)",
                       (series_uid, JobState.QUEUED, now, now))
        return None

    def set_series_state(self, series_uid: str, state: str, *, only_if: Sequence[str] = (),
                         **fields: Any) -> bool:
        """Move a series to ``state`` (optionally only from one of ``only_if``)."""
        if state not in tuple(SeriesState):
            raise ValueError(f"unknown series state {state!r}")
        allowed = {"route", "model", "error", "source_series_uid"}
        if set(fields) - allowed:
            raise ValueError(f"cannot set {sorted(set(fields) - allowed)} on a series")
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql = f"UPDATE series SET state = ?, updated_at = ?{', ' + sets if sets else ''}" \
              " WHERE series_uid = ?"
        args: list[Any] = [state, time.time(), *fields.values(), series_uid]
        if only_if:
            sql += f" AND state IN ({', '.join('?' * len(only_if))})"
            args += list(only_if)
        with self.transaction() as db:
            return db.execute(sql, args).rowcount > 0

    # --- jobs ------------------------------------------------------------------------

    def claim_job(self, state: str = JobState.RUNNING) -> Job | None:
        """Take the oldest queued job of a series that is complete (queued), or None;
        it becomes ``state`` (running here, or dispatched to the cluster).

        The series moves to processing in the same transaction: a series that is
        receiving again is never processed half-received.
        """
        now = time.time()
        with self.transaction() as db:
            row = db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1,"
                             " updated = ? WHERE id = (SELECT j.id FROM jobs j JOIN series s"
                             " ON s.series_uid = j.series_uid WHERE j.state = ?"
                             " AND s.state = ? ORDER BY j.id LIMIT 1) RETURNING *",
                             (state, now, JobState.QUEUED, SeriesState.QUEUED)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE series SET state = ?, updated_at = ? WHERE series_uid = ?",
                       (SeriesState.PROCESSING, now, row["series_uid"]))
        return _job(row)

    def queue_training(self, args: dict[str, Any], now: float | None = None) -> int:
        """Queue a training job (the cluster's ``train`` queue runs it); its id."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            return db.execute("INSERT INTO jobs (series_uid, kind, state, created, updated,"
                              " args) VALUES ('', 'train', ?, ?, ?, ?) RETURNING id",
                              (JobState.QUEUED, now, now, json.dumps(args))).fetchone()["id"]

    def claim_training(self) -> Job | None:
        """Take the oldest queued training job, as dispatched; or None."""
        with self.transaction() as db:
            row = db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, updated = ?"
                             " WHERE id = (SELECT id FROM jobs WHERE kind = 'train'"
                             " AND state = ? ORDER BY id LIMIT 1) RETURNING *",
                             (JobState.DISPATCHED, time.time(), JobState.QUEUED)).fetchone()
        return None if row is None else _job(row)

    def dispatched_jobs(self) -> list[Job]:
        rows = self.db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY id",
                               (JobState.DISPATCHED,))
        return [_job(r) for r in rows]

    def set_job_worker(self, job_id: int, worker: str) -> None:
        """Record the worker (``name@host``) a dispatched job is running on."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET worker = ?, updated = ? WHERE id = ?",
                       (worker, time.time(), job_id))

    def finish_job(self, job: Job, ok: bool, error: str | None = None, *,
                   worker: str | None = None, model: str | None = None) -> None:
        """End a job; ``worker`` ran it, ``model`` is the model version it ran (or wrote)."""
        with self.transaction() as db:
            db.execute("UPDATE jobs SET state = ?, error = ?, updated = ?,"
                       " worker = COALESCE(?, worker), model = COALESCE(?, model) WHERE id = ?",
                       (JobState.DONE if ok else JobState.FAILED, error, time.time(), worker,
                        model, job.id))

    def job(self, job_id: int) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    def last_jobs(self) -> dict[str, sqlite3.Row]:
        """The latest job of each series, by series UID."""
        rows = self.db.execute("SELECT * FROM jobs WHERE id IN (SELECT MAX(id) FROM jobs"
                               " WHERE kind = 'harmonise' GROUP BY series_uid)")
        return {r["series_uid"]: r for r in rows}

    def jobs(self, state: str | None = None) -> list[sqlite3.Row]:
        sql, args = "SELECT * FROM jobs", ()
        if state:
            sql, args = sql + " WHERE state = ?", (state,)
        return self.db.execute(sql + " ORDER BY id", args).fetchall()

    # --- restart ---------------------------------------------------------------------

    def recover(self, max_attempts: int, now: float | None = None,
                keep_dispatched: bool = False) -> dict[str, Any]:
        """Make the persisted state consistent after a crash or stop.

        Jobs that were running are queued again (their output is deterministic, so a
        rerun replaces rather than duplicates), unless they have now been interrupted
        ``max_attempts`` times: a job that kills the process (out of memory) would
        otherwise crash the node again on every restart. Those fail, with their series.
        Series still receiving restart their quiet-period clock: the node could not
        receive while it was down. Jobs dispatched to the cluster stay so with
        ``keep_dispatched`` (the cluster runs them whether the node is up or not); else
        (no cluster now) they count as running here.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            if not keep_dispatched:
                db.execute("UPDATE jobs SET state = ? WHERE state = ? AND kind = 'harmonise'",
                           (JobState.RUNNING, JobState.DISPATCHED))
            given_up = db.execute(
                "UPDATE jobs SET state = ?, updated = ?,"
                " error = 'interrupted ' || attempts || ' times'"
                " WHERE state = ? AND attempts >= ? RETURNING series_uid, error",
                (JobState.FAILED, now, JobState.RUNNING, max_attempts)).fetchall()
            for row in given_up:
                db.execute("UPDATE series SET state = ?, error = ?, updated_at = ?"
                           " WHERE series_uid = ? AND state = ?",
                           (SeriesState.FAILED, row["error"], now, row["series_uid"],
                            SeriesState.PROCESSING))
            jobs = db.execute("UPDATE jobs SET state = ?, updated = ? WHERE state = ?",
                              (JobState.QUEUED, now, JobState.RUNNING)).rowcount
            series = db.execute("UPDATE series SET state = ?, updated_at = ? WHERE state = ?"
                                " AND series_uid NOT IN (SELECT series_uid FROM jobs"
                                " WHERE state = ?)", (SeriesState.QUEUED, now,
                                                      SeriesState.PROCESSING,
                                                      JobState.DISPATCHED)).rowcount
            receiving = db.execute("UPDATE series SET last_received = MAX(last_received, ?)"
                                   " WHERE state = ?", (now, SeriesState.RECEIVING)).rowcount
        return {"jobs_requeued": jobs, "series_requeued": series, "series_receiving": receiving,
                "jobs_given_up": [r["series_uid"] for r in given_up]}


def _job(row: sqlite3.Row) -> Job:
    return Job(row["id"], row["series_uid"], row["kind"], row["attempts"], row["created"])
