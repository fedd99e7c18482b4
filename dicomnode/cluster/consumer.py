"""``dicomnode worker``: a Celery worker process that runs the node's jobs from one queue.

A prefork pool of ``concurrency`` processes (time limits need it). Each pool process
dies with the worker (``PR_SET_PDEATHSIG``): a worker killed with ``kill -9`` leaves no
orphan computing on a GPU for a job whose message the broker will deliver again anyway.
SIGTERM is Celery's warm shutdown (running jobs finish); SIGHUP does not restart the
worker (Celery's default) but only says that the config is read again before the next
job, which it is whenever the file has changed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from typing import Any

from celery import signals

from dicomnode.cluster import tasks
from dicomnode.cluster.app import build_app
from dicomnode.config import Config
from dicomnode.errors import UserError
from dicomnode.log import get_logger

log = get_logger("cluster-worker")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def device_setting(device: str | None) -> str | None:
    """``--device`` as an ``[inference] device`` value: ``cuda:N`` pins the process to GPU
    N (``CUDA_VISIBLE_DEVICES``, set before anything touches CUDA) and runs on ``cuda``."""
    if device is None or device in ("auto", "cpu", "cuda"):
        return device
    kind, _, number = device.partition(":")
    if kind != "cuda" or not number.isdigit():
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    os.environ["CUDA_VISIBLE_DEVICES"] = number
    return "cuda"


def _die_with_parent(concurrency: int, threads: int) -> None:
    """In each pool process: die with the worker; share the CPU cores between the pool."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the worker died before the call
        os._exit(1)
    import torch
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // concurrency))


def run_worker(config: Config, queue: str | None, device: str | None, concurrency: int,
               name: str | None) -> int:
    """Consume ``queue`` (default: ``[cluster] queue``) until SIGTERM; the exit status."""
    cluster = config.cluster
    if cluster is None:
        raise UserError(f"{config.path} has no [cluster] table: there is no broker to take"
                        " jobs from")
    if concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, got {concurrency}")
    queue = queue or cluster.queue
    tasks.SETTINGS = tasks.WorkerConfig(config.path, device_setting(device))
    tasks.SETTINGS.current()
    app = build_app(cluster)
    tasks.register(app, config)
    nodename = name or f"{queue}-{os.getpid()}@{socket.gethostname()}"

    def init_process(**_: Any) -> None:
        _die_with_parent(concurrency, config.inference.threads)

    def ready(**_: Any) -> None:
        signal.signal(signal.SIGHUP, lambda *_: log.info(
            "config_reload_requested", note="read again before the next job when changed"))
        log.info("worker_ready", worker=nodename, queue=queue, concurrency=concurrency,
                 device=tasks.SETTINGS.current().inference.device if tasks.SETTINGS else None)

    signals.worker_process_init.connect(init_process, weak=False)
    signals.worker_ready.connect(ready, weak=False)
    worker = app.Worker(hostname=nodename, queues=[queue], concurrency=concurrency,
                        pool_cls="prefork", loglevel="WARNING", quiet=True,
                        without_gossip=True, without_mingle=True, without_heartbeat=True)
    worker.start()
    log.info("worker_stopped", worker=nodename, exitcode=worker.exitcode)
    return int(worker.exitcode or 0)
