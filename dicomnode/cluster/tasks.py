"""What a ``dicomnode worker`` runs: one harmonisation job or one site retraining per task.

The worker reads the node's config file (the same one, or a copy naming the worker's own
mount of the shared ``data_dir`` and ``models_dir``) and reads it again before a job when
the file has changed, so a route's model changed in the config reaches running workers;
a model folder whose weights changed is loaded anew by the model cache (keyed by the
weights' hash). Workers never open the node's index: they read the series from the shared
``data_dir``, stage their output there, and return the outcome; the node archives it.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import Any

from celery import Celery, Task

from dicomnode.cluster.app import SOFT_SHARE
from dicomnode.cluster.messages import (
    HARMONISE_TASK,
    STAGING,
    TRAIN_TASK,
    attempts_key,
    encode_outcome,
    site_options_from_json,
)
from dicomnode.config import Config, load_config
from dicomnode.log import get_logger
from dicomnode.process.worker import harmonise_job
from pipelines.harmonise import EXECUTION_CACHE

log = get_logger("cluster-worker")
PROGRESS = "PROGRESS"  # a training task's state while it reports progress
PROGRESS_LINES = 20  # the latest progress lines a training task's state carries


@dataclasses.dataclass
class WorkerConfig:
    """The config a worker runs jobs with: read again when its file changed; ``device``
    (``dicomnode worker --device``) overrides ``[inference] device``."""

    path: Path
    device: str | None = None
    _stat: tuple[int, int, int] | None = None
    _config: Config | None = None

    def current(self) -> Config:
        st = self.path.stat()
        stat = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._config is None or stat != self._stat:
            config = load_config(self.path)
            if self.device:
                config = dataclasses.replace(config, inference=dataclasses.replace(
                    config.inference, device=self.device))
            if self._config is not None:
                log.info("config_reloaded", config=str(self.path),
                         routes={r.name: r.model for r in config.routes})
            self._config, self._stat = config, stat
        return self._config

    def execution_cache(self, config: Config) -> Path:
        """Inference decisions per model and machine: one file per worker host."""
        return config.node.data_dir / "workers" / os.uname().nodename / EXECUTION_CACHE


SETTINGS: WorkerConfig | None = None  # set by dicomnode.cluster.consumer before the pool forks


def _error(reason: str, attempt: int, worker: str) -> dict[str, Any]:
    return {"status": "error", "reason": reason, "attempt": attempt, "worker": worker}


def harmonise(task: Task, job: dict[str, Any]) -> dict[str, Any]:
    """Run one harmonisation job (the node's message: ``job``, ``series_uid``,
    ``created``, ``files``); the outcome, or ``status = "error"`` with the reason."""
    assert SETTINGS is not None
    config = SETTINGS.current()
    worker, tid = task.request.hostname, task.request.id
    attempt = int(task.backend.client.incr(attempts_key(tid)))
    task.backend.client.expire(attempts_key(tid), 30 * 86400)
    bound = log.bind(job=job["job"], series_uid=job["series_uid"], worker=worker,
                     attempt=attempt)
    limit = config.node.max_job_attempts
    if attempt > limit:  # the earlier runs never reported: their workers died under them
        bound.error("job_given_up", reason="interrupted")
        return _error(f"interrupted {attempt - 1} times (worker killed or over the task"
                      " time limit)", attempt, worker)
    data_dir = config.node.data_dir
    staging = data_dir / STAGING / tid / uuid.uuid4().hex  # this run's own folder
    bound.info("job_started", instances=len(job["files"]))
    try:
        outcome = harmonise_job(config, [data_dir / p for p in job["files"]], staging,
                                job["created"], SETTINGS.execution_cache(config))
    except Exception as exc:  # the node retries it up to max_job_attempts, or fails it
        reason = f"{type(exc).__name__}: {exc}"
        bound.exception("job_failed", reason=reason)
        return _error(reason, attempt, worker)
    bound.info("job_finished", status=outcome.status, instances=len(outcome.outputs),
               **{f"{k}_s": round(v, 3) for k, v in outcome.seconds.items()})
    return {**encode_outcome(outcome, data_dir), "attempt": attempt, "worker": worker}


def train(task: Task, job: dict[str, Any]) -> dict[str, Any]:
    """Run ``dicomnode train site`` for the node (``job["args"]``: the options); progress
    lines go into the task's state, which the node logs."""
    from pipelines.errors import PipelineError
    from pipelines.model_folder import read_model_info
    from trainers.site import train_site
    from trainers.train import TrainingError

    assert SETTINGS is not None
    config = SETTINGS.current()
    worker = task.request.hostname
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        log.info("train_progress", job=job["job"], line=line)
        task.update_state(state=PROGRESS, meta={"count": len(lines),
                                                "lines": lines[-PROGRESS_LINES:]})

    options = site_options_from_json(job["args"])
    try:
        outcome = train_site(options, routes=config.routes, spool=config.spool_dir,
                             models_dir=config.node.models_dir, log=progress)
    except Exception as exc:  # no data, over the time limit...: the node fails the job
        log.exception("train_failed", job=job["job"], expected=isinstance(
            exc, TrainingError | PipelineError | OSError))
        return _error(f"{type(exc).__name__}: {exc}", 1, worker)
    info = read_model_info(outcome.folder)
    return {"status": "trained", "folder": outcome.folder.name, "version": info.version,
            "worker": worker, "count": len(lines), "lines": lines[-PROGRESS_LINES:]}


def register(app: Celery, config: Config) -> None:
    """Register the tasks on ``app`` with the time limits of ``config``'s ``[cluster]``."""
    cluster = config.cluster
    assert cluster is not None
    for name, body, limit in ((HARMONISE_TASK, harmonise, cluster.task_time_limit),
                              (TRAIN_TASK, train, cluster.train_time_limit)):
        app.task(name=name, bind=True, time_limit=limit,
                 soft_time_limit=limit * SOFT_SHARE)(body)

