"""The harmonise worker: takes completed series off the persistent queue and runs the pipeline.

Each job ends ``done`` or ``failed`` with a reason that ``dicomnode status`` shows; an
exception in a model fails that job only. Derived instances are staged, then stored
through the same durable path as received ones (archive folder, index rows with
``kind='derived'``), so a rerun after a crash finds identical bytes under identical
UIDs and stores nothing twice.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dicomnode import metrics
from dicomnode.config import Config
from dicomnode.dispatch.outbox import enqueue_series
from dicomnode.log import get_logger
from dicomnode.store.archive import drop_series
from dicomnode.store.index import Index, Job, SeriesState
from dicomnode.store.ingest import parse_header, receive_instance
from pipelines.harmonise import EXECUTION_CACHE, harmonise_series

log = get_logger("worker")


@dataclass
class Worker:
    config: Config
    index: Index

    @property
    def staging(self) -> Path:
        return self.config.node.data_dir / "staging"

    def step(self) -> bool:
        """Run one queued job; False when the queue was empty."""
        job = self.index.claim_job()
        if job is None:
            return False
        started = time.monotonic()
        try:
            self.run(job)
        except Exception as exc:  # a failing model must not stop the node or other jobs
            reason = f"{type(exc).__name__}: {exc}"
            log.exception("job_failed", job=job.id, series_uid=job.series_uid, reason=reason)
            self.index.set_series_state(job.series_uid, SeriesState.FAILED,
                                        only_if=[SeriesState.PROCESSING], error=reason)
            self.index.finish_job(job, ok=False, error=reason)
        finally:  # staged output is archived or worthless, whatever happened
            shutil.rmtree(self.staging / str(job.id), ignore_errors=True)
            metrics.JOB_SECONDS.observe(time.monotonic() - started)
        return True

    def run(self, job: Job) -> None:
        cfg = self.config
        data_dir = cfg.node.data_dir
        files = [data_dir / p for p in self.index.series_files(job.series_uid)]
        staging = self.staging / str(job.id)
        shutil.rmtree(staging, ignore_errors=True)
        log.info("job_started", job=job.id, series_uid=job.series_uid, instances=len(files),
                 attempt=job.attempts)
        outcome = harmonise_series(files, routes=cfg.routes, models_dir=cfg.node.models_dir,
                                   out_dir=staging, options=cfg.inference,
                                   sr=cfg.node.write_sr,
                                   execution_cache=cfg.node.data_dir / EXECUTION_CACHE,
                                   when=datetime.fromtimestamp(job.created, UTC))
        if outcome.status == "unmatched":
            state = (SeriesState.UNMATCHED if cfg.node.unmatched == "archive"
                     else SeriesState.IGNORED)
            self.index.set_series_state(job.series_uid, state,
                                        only_if=[SeriesState.PROCESSING], error=None)
            self.index.finish_job(job, ok=True)
            log.info("series_unmatched", series_uid=job.series_uid, action=state,
                     reason=outcome.reason)
            if state == SeriesState.IGNORED:
                self._drop(job.series_uid)
            return
        if outcome.status != "harmonised":
            self.index.set_series_state(job.series_uid, SeriesState.FAILED,
                                        only_if=[SeriesState.PROCESSING],
                                        error=outcome.reason, route=outcome.route)
            self.index.finish_job(job, ok=False, error=outcome.reason)
            log.warning("series_rejected", series_uid=job.series_uid, reason=outcome.reason)
            return
        model = f"{outcome.model.name} {outcome.model.version}"
        metrics.harmonised(outcome.model.name, outcome.seconds, len(outcome.outputs))
        derived = [self._archive(outcome.outputs)]
        if outcome.report is not None:
            derived.append(self._archive([outcome.report]))
        for uid in derived:
            self.index.set_series_state(uid, SeriesState.ARCHIVED,
                                        source_series_uid=job.series_uid,
                                        route=outcome.route, model=model)
        reopened = not self.index.set_series_state(
            job.series_uid, SeriesState.HARMONISED, only_if=[SeriesState.PROCESSING],
            route=outcome.route, model=model, error=None)
        destinations = next(r.send_to for r in cfg.routes if r.name == outcome.route)
        queued = sum(enqueue_series(self.index, uid, destinations) for uid in derived
                     if destinations)
        self.index.finish_job(job, ok=True)
        log.info("series_harmonised", series_uid=job.series_uid, derived_series_uid=derived[0],
                 report_series_uid=derived[1] if len(derived) > 1 else None,
                 route=outcome.route, model=outcome.model.name,
                 weights_sha256=outcome.model.sha256, instances=len(outcome.outputs),
                 sends_queued=queued, reopened_while_processing=reopened)

    def _drop(self, series_uid: str) -> None:
        """``unmatched = "ignore"``: the originals are not kept (files and index rows)."""
        study_uid = self.index.series(series_uid)["study_uid"]
        dropped = drop_series(self.config, self.index, series_uid, [SeriesState.IGNORED])
        if dropped is not None:
            log.info("series_dropped", series_uid=series_uid, study_uid=study_uid,
                     instances=dropped)

    def _archive(self, files: Sequence[Path]) -> str:
        """Store staged instances of one derived series durably in the archive; its UID."""
        node = self.config.node
        series_uids = set()
        for path in files:
            data = path.read_bytes()
            record = parse_header(data)
            receive_instance(data, record, index=self.index, data_dir=node.data_dir,
                             root=self.config.archive_dir,
                             reserve_bytes=node.disk_reserve_mb * 2**20,
                             duplicate_policy="replace", kind="derived")
            series_uids.add(record.series_uid)
        if len(series_uids) != 1:
            raise RuntimeError(f"pipeline wrote {len(series_uids)} series, expected one")
        return series_uids.pop()
