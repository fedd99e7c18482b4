"""What travels between the node and its workers, as JSON: no I/O here.

A task carries a job's row (id, creation time) and what the worker needs to run it (the
series' files, relative to the shared ``data_dir``; a training job's options); its result
carries the outcome with the derived files staged on the shared ``data_dir``. Paths travel
relative to ``data_dir``, so a worker may mount it elsewhere than the node.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from dicomnode.store.index import Job
from pipelines.harmonise import ModelRef, SeriesOutcome
from trainers.options import SiteOptions

HARMONISE_TASK = "dicomnode.harmonise"
TRAIN_TASK = "dicomnode.train"
STAGING = Path("staging") / "cluster"  # under data_dir: each task's output, until archived


def task_id(job: Job) -> str:
    """A job's Celery task id: the same on every dispatch of that job (so a redelivered or
    re-published copy is the same task), different for a job of another index."""
    return f"dicomnode-{job.id}-{job.created:.6f}"


def dispatched_key(tid: str) -> str:
    """Set by the node after publishing, deleted when it has recorded the result: a job
    whose key the broker no longer has was lost by it (a Redis restart without its
    append-only file) and is published again."""
    return f"dicomnode:dispatched:{tid}"


def attempts_key(tid: str) -> str:
    """Counted up by every worker that starts the task (redeliveries after a worker was
    killed included): a job that keeps killing its workers ends after max_job_attempts."""
    return f"dicomnode:attempts:{tid}"


def _relative(path: Path | None, data_dir: Path) -> str | None:
    return None if path is None else str(Path(path).relative_to(data_dir))


def encode_outcome(outcome: SeriesOutcome, data_dir: Path) -> dict[str, Any]:
    """A worker's harmonisation outcome for the node (what :meth:`Worker.conclude` uses)."""
    model = outcome.model
    return {"status": outcome.status, "series_uid": outcome.series_uid,
            "reason": outcome.reason, "route": outcome.route,
            "model": None if model is None else [model.name, model.version, model.sha256],
            "outputs": [_relative(p, data_dir) for p in outcome.outputs],
            "report": _relative(outcome.report, data_dir)}


def decode_outcome(result: dict[str, Any], data_dir: Path) -> SeriesOutcome:
    """The outcome a worker sent, its staged files under this machine's ``data_dir``."""
    model = result["model"]
    return SeriesOutcome(result["status"], result["series_uid"], result["reason"],
                         result["route"], None if model is None else ModelRef(*model),
                         outputs=tuple(data_dir / p for p in result["outputs"]),
                         report=None if result["report"] is None else data_dir / result["report"])


def site_options_to_json(options: SiteOptions) -> dict[str, Any]:
    return {f.name: str(v) if isinstance(v := getattr(options, f.name), Path) else v
            for f in dataclasses.fields(options)}


def site_options_from_json(data: dict[str, Any]) -> SiteOptions:
    """The inverse of :func:`site_options_to_json` (strings back to paths where the field
    is a path)."""
    hints = typing.get_type_hints(SiteOptions)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        is_path = hint is Path or Path in typing.get_args(hint)
        values[name] = Path(value) if is_path and isinstance(value, str) else value
    return SiteOptions(**values)
