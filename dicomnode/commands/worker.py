"""``dicomnode worker``: run a Celery worker for the node's ``[cluster]`` until SIGTERM."""

from __future__ import annotations

import argparse

from dicomnode import log as logs
from dicomnode.commands import add_config_option
from dicomnode.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a cluster worker (harmonisation or training jobs)",
                       description="Take the node's jobs from its [cluster] broker and run"
                       " them: harmonisation from [cluster] queue, training with --queue"
                       " train. Needs the node's data_dir and models_dir mounted as the"
                       " config names them (docs/scale-out.md). SIGTERM lets running jobs"
                       " finish, then exits.")
    add_config_option(p)
    p.add_argument("--queue", help="queue to take jobs from (default: [cluster] queue;"
                   " [cluster] train_queue for training jobs)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: [inference] device)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="jobs run at once, one process each (default: 1)")
    p.add_argument("--name", help="worker name as name@host, shown in status"
                   " (default: QUEUE-PID@HOST)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicomnode.cluster.consumer import run_worker  # loads celery and torch
    config = load_config(args.config)
    logs.configure(config.node.log_level)
    return run_worker(config, args.queue, args.device, args.concurrency, args.name)
