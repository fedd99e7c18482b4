"""The node's side of the cluster: its index stays the source of truth for every job.

Each pass (every ``[cluster] poll_interval``):

1. **dispatch**: queued jobs become ``dispatched`` in the index, then are published to
   their queue under a task id fixed by the job (:func:`~dicomnode.cluster.messages.task_id`),
   then marked as published in Redis (``dispatched_key``).
2. **collect**: one round trip reads every dispatched job's result and mark. A finished
   harmonisation is concluded exactly as the embedded worker concludes it
   (:meth:`~dicomnode.process.worker.Worker.conclude`: archive, series state, sends, job);
   a job that failed on a worker is published again until it has run max_job_attempts
   times, then fails with its reason and the worker's name; a running one records its
   worker; a training job's progress lines go to the node's log.
3. **reconcile**: a dispatched job with neither result nor mark was lost by the broker (a
   Redis restart without its append-only file, or a node stopped between steps 1 and 2):
   it is published again. A copy published twice is harmless: the job's output has fixed
   UIDs, and only the first result is concluded.

While Redis is unreachable a pass fails at its first call; the next pass after Redis is
back reconciles everything at once.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import redis
from kombu.exceptions import OperationalError

from dicomnode.cluster.app import build_app
from dicomnode.cluster.messages import (
    HARMONISE_TASK,
    STAGING,
    TRAIN_TASK,
    attempts_key,
    decode_outcome,
    dispatched_key,
    task_id,
)
from dicomnode.cluster.tasks import PROGRESS
from dicomnode.config import Config
from dicomnode.log import get_logger
from dicomnode.process.worker import Worker
from dicomnode.store.index import Index, Job, JobState

log = get_logger("cluster")
BROKER_ERRORS = (redis.RedisError, OperationalError, OSError)


class Dispatcher:
    """Hands the node's jobs to the cluster and records what comes back."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker  # concludes harmonisation jobs; its config follows reloads
        self.index: Index = worker.index
        cluster = worker.config.cluster
        assert cluster is not None
        self.cluster = cluster
        self.app = build_app(cluster)
        self.redis = redis.Redis.from_url(cluster.broker, socket_timeout=10,
                                          socket_connect_timeout=5)
        self._reachable = True
        self._running: dict[int, str] = {}  # job id -> worker, as last logged
        self._progress: dict[int, int] = {}  # training job id -> progress lines logged

    @property
    def config(self) -> Config:
        return self.worker.config

    def step(self) -> bool:
        """One pass; True when it dispatched or concluded something."""
        try:
            busy = self.dispatch()
            busy = self.collect() or busy
        except BROKER_ERRORS as exc:
            if self._reachable:
                log.error("broker_unreachable", reason=f"{type(exc).__name__}: {exc}")
            self._reachable = False
            return False
        if not self._reachable:
            log.info("broker_reachable")
            self._reachable = True
        return busy

    def dispatch(self) -> bool:
        sent = False
        while job := (self.index.claim_job(JobState.DISPATCHED) or self.index.claim_training()):
            self.publish(job)
            sent = True
        return sent

    def publish(self, job: Job) -> None:
        """Publish ``job``'s task (again), then mark it published."""
        tid = task_id(job)
        if job.kind == "train":
            name, queue = TRAIN_TASK, self.cluster.train_queue
            row = self.index.job(job.id)
            message: dict[str, Any] = {"job": job.id, "args": _json(row["args"])}
        else:
            name, queue = HARMONISE_TASK, self.cluster.queue
            message = {"job": job.id, "series_uid": job.series_uid, "created": job.created,
                       "files": self.index.series_files(job.series_uid)}
        self.redis.delete(self.app.backend.get_key_for_task(tid))  # an earlier attempt's
        with self.app.producer_or_acquire() as producer:
            # declared each time: a Redis that lost its data lost the queue's binding too,
            # and a message published without it would be dropped
            self.app.amqp.queues[queue].declare(channel=producer.channel)
            self.app.send_task(name, kwargs={"job": message}, task_id=tid, queue=queue,
                               retry=False, producer=producer)
        self.redis.set(dispatched_key(tid), job.kind)
        log.info("job_dispatched", job=job.id, kind=job.kind, series_uid=job.series_uid or None,
                 queue=queue, task_id=tid, files=len(message.get("files", ())))

    def collect(self) -> bool:
        jobs = self.index.dispatched_jobs()
        if not jobs:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            tid = task_id(job)
            pipe.get(self.app.backend.get_key_for_task(tid))
            pipe.exists(dispatched_key(tid))
        replies = pipe.execute()
        concluded = False
        for job, raw, marked in zip(jobs, replies[::2], replies[1::2], strict=True):
            meta = self.app.backend.decode_result(raw) if raw else None
            state = meta["status"] if meta else "PENDING"
            if state == "SUCCESS":
                self.finished(job, meta["result"])
                concluded = True
            elif state == "FAILURE":  # the task itself broke (killed at the hard time limit)
                exc = meta["result"]  # decoded into the exception it raised
                self.failed(job, f"{type(exc).__name__}: {exc}", attempt=None, worker=None)
            elif state == "STARTED":
                self.running(job, (meta["result"] or {}).get("hostname"))
            elif state == PROGRESS:
                self.progress(job, meta["result"] or {})
            elif meta is None and not marked:
                log.warning("job_reenqueued", job=job.id, series_uid=job.series_uid or None,
                            reason="the broker does not have it (restarted without its data?)")
                self.publish(job)
        return concluded

    def running(self, job: Job, worker: str | None) -> None:
        if worker and self._running.get(job.id) != worker:
            self._running[job.id] = worker
            self.index.set_job_worker(job.id, worker)
            log.info("job_running", job=job.id, series_uid=job.series_uid or None, worker=worker)

    def progress(self, job: Job, meta: dict[str, Any]) -> None:
        seen, count = self._progress.get(job.id, 0), int(meta.get("count", 0))
        lines = meta.get("lines", [])
        for line in lines[max(0, len(lines) - (count - seen)):]:
            log.info("train_progress", job=job.id, line=line)
        self._progress[job.id] = count

    def finished(self, job: Job, result: dict[str, Any]) -> None:
        worker = result.get("worker")
        if result["status"] == "error":
            self.failed(job, result["reason"], result.get("attempt"), worker)
            return
        if job.kind == "train":
            self.progress(job, result)  # the lines since the node last looked
            self.index.finish_job(job, ok=True, worker=worker,
                                  model=f"{result['folder']} {result['version']}")
            log.info("model_trained", job=job.id, folder=result["folder"],
                     version=result["version"], worker=worker)
        else:
            data_dir = self.config.node.data_dir
            try:
                self.worker.conclude(job, decode_outcome(result, data_dir), worker)
            except Exception as exc:  # e.g. the disk is full: this job fails, not the node
                reason = f"{type(exc).__name__}: {exc}"
                log.exception("job_failed", job=job.id, series_uid=job.series_uid,
                              reason=reason, worker=worker)
                self.worker.fail(job, reason, worker)
        self.forget(job)

    def failed(self, job: Job, reason: str, attempt: int | None, worker: str | None) -> None:
        """A job's attempt failed: publish it again, or (attempts spent, or training) fail
        it for good with the reason and the worker."""
        limit = self.config.node.max_job_attempts
        if job.kind != "train" and (attempt or 0) < limit:
            log.warning("job_retried", job=job.id, series_uid=job.series_uid, attempt=attempt,
                        reason=reason, worker=worker)
            self.publish(job)
            return
        if job.kind == "train":
            self.index.finish_job(job, ok=False, error=reason, worker=worker)
        else:
            self.worker.fail(job, f"{reason} (attempt {attempt} of {limit})", worker)
        log.error("job_failed", job=job.id, kind=job.kind, series_uid=job.series_uid or None,
                  reason=reason, attempt=attempt, worker=worker)
        self.forget(job)

    def forget(self, job: Job) -> None:
        """The job is recorded in the index: drop its broker state and staged files."""
        tid = task_id(job)
        self.redis.delete(self.app.backend.get_key_for_task(tid), dispatched_key(tid),
                          attempts_key(tid))
        shutil.rmtree(self.config.node.data_dir / STAGING / tid, ignore_errors=True)
        self._running.pop(job.id, None)
        self._progress.pop(job.id, None)


def _json(text: str | None) -> Any:
    return json.loads(text or "{}")
