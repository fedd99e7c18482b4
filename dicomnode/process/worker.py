"""The harmonise worker: takes completed series off the persistent queue and runs the pipeline.

Each job ends ``done`` or ``failed`` with a reason that ``dicomnode status`` shows; an
exception in a model fails that job only. Derived instances are staged, then stored
through the same durable path as received ones (archive folder, index rows with
``kind='derived'``), so a rerun after a crash finds identical bytes under identical
UIDs and stores nothing twice.

A job is two halves: :func:`harmonise_job` computes (reads the series, writes the derived
instances into a staging folder) and :meth:`Worker.conclude` records the outcome in the
index (archive, series states, sends, job). The embedded worker runs both in the node;
with a ``[cluster]`` a Celery worker runs the first on a GPU host and the node the second
(``dicomnode.cluster``), so both paths archive, index and send alike.
"""

from __future__ import annotations

import shutil
import socket
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
from pipelines.harmonise import EXECUTION_CACHE, SeriesOutcome, harmonise_series

log = get_logger("worker")


def harmonise_job(config: Config, files: Sequence[Path], out_dir: Path, created: float,
                  execution_cache: Path) -> SeriesOutcome:
    """Route and harmonise one job's series into ``out_dir`` (emptied first). ``created``
    (when the job was queued) is the processing time the output records, so a re-run of
    the same job, here or on another worker, writes the same bytes under the same UIDs."""
    shutil.rmtree(out_dir, ignore_errors=True)
    return harmonise_series(files, routes=config.routes, models_dir=config.node.models_dir,
                            out_dir=out_dir, options=config.inference, sr=config.node.write_sr,
                            execution_cache=execution_cache,
                            when=datetime.fromtimestamp(created, UTC))


def model_label(outcome: SeriesOutcome) -> str | None:
    """The model version a job ran, as its job row records it: name, version, weights."""
    ref = outcome.model
    return None if ref is None else f"{ref.name} {ref.version} {ref.sha256[:12]}"


@dataclass
class Worker:
    config: Config  # replaced by the node when it reloads its config (SIGHUP)
    index: Index
    host: str = socket.gethostname()

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
            self.fail(job, reason, self.host)
        finally:  # staged output is archived or worthless, whatever happened
            shutil.rmtree(self.staging / str(job.id), ignore_errors=True)
            metrics.JOB_SECONDS.observe(time.monotonic() - started)
        return True

    def fail(self, job: Job, reason: str, worker: str | None = None) -> None:
        """The job could not run to an outcome (an exception): it fails with its series."""
        self.index.set_series_state(job.series_uid, SeriesState.FAILED,
                                    only_if=[SeriesState.PROCESSING], error=reason)
        self.index.finish_job(job, ok=False, error=reason, worker=worker)

    def run(self, job: Job) -> None:
        cfg = self.config
        data_dir = cfg.node.data_dir
        files = [data_dir / p for p in self.index.series_files(job.series_uid)]
        log.info("job_started", job=job.id, series_uid=job.series_uid, instances=len(files),
                 attempt=job.attempts)
        outcome = harmonise_job(cfg, files, self.staging / str(job.id), job.created,
                                data_dir / EXECUTION_CACHE)
        self.conclude(job, outcome, self.host)

    def conclude(self, job: Job, outcome: SeriesOutcome, worker: str) -> None:
        """Record a job's outcome: archive the staged derived instances, move the series
        on, queue the sends, end the job. Run again with the same outcome (a crash in
        between) it stores and sends nothing twice."""
        cfg = self.config
        model_version = model_label(outcome)
        if outcome.status == "unmatched":
            state = (SeriesState.UNMATCHED if cfg.node.unmatched == "archive"
                     else SeriesState.IGNORED)
            self.index.set_series_state(job.series_uid, state,
                                        only_if=[SeriesState.PROCESSING], error=None)
            self.index.finish_job(job, ok=True, worker=worker)
            log.info("series_unmatched", series_uid=job.series_uid, action=state,
                     reason=outcome.reason)
            if state == SeriesState.IGNORED:
                self._drop(job.series_uid)
            return
        if outcome.status != "harmonised":
            self.index.set_series_state(job.series_uid, SeriesState.FAILED,
                                        only_if=[SeriesState.PROCESSING],
                                        error=outcome.reason, route=outcome.route)
            self.index.finish_job(job, ok=False, error=outcome.reason, worker=worker,
                                  model=model_version)
            log.warning("series_rejected", series_uid=job.series_uid, reason=outcome.reason)
            return
        route = next((r for r in cfg.routes if r.name == outcome.route), None)
        if route is None:  # a worker routed with a config the node no longer has
            raise RuntimeError(f"route '{outcome.route}' is not in the node's config")
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
        queued = sum(enqueue_series(self.index, uid, route.send_to) for uid in derived
                     if route.send_to)
        self.index.finish_job(job, ok=True, worker=worker, model=model_version)
        log.info("series_harmonised", series_uid=job.series_uid, derived_series_uid=derived[0],
                 report_series_uid=derived[1] if len(derived) > 1 else None,
                 route=outcome.route, model=outcome.model.name,
                 model_version=outcome.model.version, weights_sha256=outcome.model.sha256,
                 worker=worker, instances=len(outcome.outputs),
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
