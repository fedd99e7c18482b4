"""The Celery app of a node's ``[cluster]``: broker and result store in one Redis, and the
settings that make a job survive a worker or broker failure.

* ``task_acks_late`` with a prefetch of 1: a job leaves the broker only when a worker has
  finished it; a worker killed mid-job leaves it unacknowledged, and the broker delivers it
  again after ``visibility_timeout`` (checked every second by the live workers).
* ``task_reject_on_worker_lost``: a pool process that dies (killed for memory) puts its job
  back at once.
* Time limits: a job gets ``task_time_limit`` (training: ``train_time_limit``); at 90 % of
  it a soft limit raises in the task, which reports the job failed for this attempt; at
  100 % the pool process is killed. The visibility timeout is longer than both (config.py
  checks), so a running job is never delivered twice.
* ``task_track_started``: the node sees which worker runs a job.
"""

from __future__ import annotations

from celery import Celery

from dicomnode.cluster.messages import HARMONISE_TASK, TRAIN_TASK
from dicomnode.config import ClusterSettings

RESULT_DAYS = 7  # results the node has not collected (it was down) are kept this long
SOFT_SHARE = 0.9  # of a time limit, when the task is told to stop


def build_app(cluster: ClusterSettings) -> Celery:
    """A Celery app for ``cluster``; the node publishes with it, workers consume with it."""
    app = Celery("dicomnode", broker=cluster.broker, backend=cluster.broker,
                 set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_expires=RESULT_DAYS * 86400,
        task_default_queue=cluster.queue,
        task_routes={HARMONISE_TASK: {"queue": cluster.queue},
                     TRAIN_TASK: {"queue": cluster.train_queue}},
        broker_transport_options={"visibility_timeout": cluster.visibility_timeout,
                                  "unacked_restore_interval": 1,
                                  "unacked_restore_throttle": 1},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,  # the node's JSON log lines, not Celery's
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,  # no pidbox traffic: the index is the truth
    )
    return app
