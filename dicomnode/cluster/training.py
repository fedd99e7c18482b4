"""``dicomnode train site --cluster``: a site retraining as a job of the node's index.

The job is queued in the index (the source of truth); the running node dispatches it to
``[cluster] train_queue``, logs the worker's progress lines and records the model version
it wrote into ``models_dir``. This command waits for that record.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dicomnode.cluster.messages import site_options_to_json
from dicomnode.config import Config
from dicomnode.errors import UserError
from dicomnode.store.index import Index, JobState
from trainers.options import SiteOptions


def train_on_cluster(config: Config, options: SiteOptions, poll: float = 1.0) -> Path:
    """Queue the training job, wait until the node records its end; the new model folder."""
    if config.cluster is None:
        raise UserError(f"--cluster: {config.path} has no [cluster] table")
    if not any(r.name == options.route for r in config.routes):
        raise UserError(f"no route named '{options.route}' (known: "
                        f"{', '.join(r.name for r in config.routes) or 'none'})")
    index = Index(config.index_path)
    job = index.queue_training(site_options_to_json(options))
    print(f"training job {job} queued for [cluster] {config.cluster.train_queue}; progress"
          " in the node's log (train_progress events)", file=sys.stderr)
    while (row := index.job(job))["state"] not in (JobState.DONE, JobState.FAILED):
        time.sleep(poll)
    if row["state"] == JobState.FAILED:
        raise UserError(f"training job {job} failed on {row['worker']}: {row['error']}")
    return config.node.models_dir / row["model"].split()[0]
