"""Cluster throughput and overhead: the node with its embedded worker, then with 1 and 2
``dicomnode worker`` processes through a real Redis (Debian's redis-server).

For each set-up, a fresh node (data in a temporary folder) gets:

1. **latency**: ``--latency`` series sent one at a time, each waited for: the time from the
   series' completion (``series_complete``) to its harmonised series archived
   (``series_harmonised``), and for the cluster its parts: completion -> published
   (``job_dispatched``), published -> a worker starts it (``job_started``), the worker's run
   (-> ``job_finished``), finished -> archived by the node; for the embedded worker:
   completion -> start, run, run -> archived. The cluster's overhead per series is its mean
   latency minus the embedded worker's and, less exposed to a busy machine's noise in the
   run itself, its time outside the run minus the embedded worker's.
2. **throughput**: ``--series`` series sent back to back (one association each); series/hour
   from the first completion to the last archived series.

The model is a tiny residual CNN (4 features, 2 blocks, random weights), so the bench
measures the cluster path rather than inference; every process runs inference on
``--threads`` CPU threads (default 1: one core per worker). ``--device cuda`` runs the
workers on the GPU instead (the embedded node too).

    python3 bench/cluster.py [--series 8] [--slices 64] [--size 256] [--latency 3]
                             [--setups embedded,1,2] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom import dcmread  # noqa: E402

from tests.dicom_factory import write_series  # noqa: E402
from tests.model_factory import make_plain_model  # noqa: E402
from tests.nodeutil import (  # noqa: E402
    STARTED,
    NodeProcess,
    WorkerProcess,
    free_port,
    kill_started,
    log_events,
    storescu,
    wait_for,
    write_config,
)
from tests.redis_server import RedisServer  # noqa: E402

ROUTE = """
[inference]
threads = {threads}
device = "{device}"

[[routes]]
name = "ct"
model = "tiny"
[routes.match]
Modality = "CT"
"""
CLUSTER = """
[cluster]
broker = "{broker}"
task_time_limit = 600
train_time_limit = 600
visibility_timeout = 700
poll_interval = 0.2
"""


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def by_series(events: list[dict[str, Any]]) -> dict[str, float]:
    """The time of each series' (first) event."""
    out: dict[str, float] = {}
    for e in events:
        out.setdefault(e["series_uid"], stamp(e))
    return out


def run_setup(root: Path, workers: int, series: list[tuple[str, list[Path]]], latency: int,
              args: argparse.Namespace) -> dict[str, Any]:
    """One set-up (0 workers: the embedded one) on a fresh node; its measurements."""
    before = len(STARTED)
    root.mkdir(parents=True)
    redis = RedisServer(root / "redis").start() if workers else None
    extra = ROUTE.format(threads=args.threads, device=args.device)
    if redis:
        extra += CLUSTER.format(broker=redis.url)
    port = free_port()
    config = write_config(root / "node.toml", port, root / "var", series_timeout=1.0,
                          extra_node=f'models_dir = "{args.models}"', extra=extra)
    node = NodeProcess(config, root / "node.log").start()
    started = [WorkerProcess(config, root / f"worker-{i}.log", f"w{i}", "--device",
                             args.device).launch() for i in range(workers)]
    pool = [w.ready() for w in started]
    try:
        def harmonised(uids: list[str]) -> bool:
            done = {e["series_uid"] for e in node.events("series_harmonised")
                    if e.get("component") == "worker"}
            return set(uids) <= done

        for uid, files in series[:latency]:  # one at a time
            storescu(port, files)
            wait_for(lambda u=uid: harmonised([u]), 900, interval=0.2, what="a series")
        rest = series[latency:]
        for _, files in rest:  # back to back
            storescu(port, files)
        wait_for(lambda: harmonised([u for u, _ in rest]), 3600, interval=0.5,
                 what="every series")
    finally:
        node.stop()
        kill_started(since=before)
    complete = by_series(node.events("series_complete"))
    # the node's worker module logs it once archived (pipelines' event of the same name,
    # in the embedded node's log too, comes before archiving)
    archived = by_series([e for e in node.events("series_harmonised")
                          if e.get("component") == "worker"])
    lat_uids = [u for u, _ in series[:latency]]
    out: dict[str, Any] = {
        "latency_s": statistics.mean(archived[u] - complete[u] for u in lat_uids)}
    if not workers:  # the same parts in the node: completion -> start, run, archive
        begun = by_series(node.events("job_started"))
        ran = by_series([e for e in node.events("series_harmonised")
                         if e.get("component") == "harmonise"])
        out.update({key: statistics.mean(b[u] - a[u] for u in lat_uids) for key, a, b in (
            ("complete_to_started_s", complete, begun), ("run_s", begun, ran),
            ("run_to_archived_s", ran, archived))})
    else:
        dispatched = by_series(node.events("job_dispatched"))
        worker_events = [e for w in pool for e in log_events(w.log)]
        begun = by_series([e for e in worker_events if e["event"] == "job_started"])
        ended = by_series([e for e in worker_events if e["event"] == "job_finished"])
        out.update({key: statistics.mean(b[u] - a[u] for u in lat_uids) for key, a, b in (
            ("complete_to_dispatched_s", complete, dispatched),
            ("dispatched_to_started_s", dispatched, begun),
            ("worker_run_s", begun, ended), ("finished_to_archived_s", ended, archived))})
    rest_uids = [u for u, _ in series[latency:]]
    span = max(archived[u] for u in rest_uids) - min(complete[u] for u in rest_uids)
    out["throughput_series"] = len(rest_uids)
    out["throughput_span_s"] = span
    out["series_per_hour"] = 3600 * len(rest_uids) / span
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=8, help="series for the throughput")
    parser.add_argument("--latency", type=int, default=3, help="series for the latency")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--setups", default="embedded,1,2",
                        help="comma-separated: embedded and/or numbers of workers")
    parser.add_argument("--threads", type=int, default=1, help="inference threads each")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        root = Path(tmp)
        args.models = root / "models"
        make_plain_model(args.models, "tiny", blocks=2)
        series = []
        for i in range(args.latency + args.series):
            files = write_series(root / "in" / f"s{i}", slices=args.slices, size=args.size,
                                 seed=100 + i)
            series.append((str(dcmread(files[0]).SeriesInstanceUID), files))
        print(f"{args.latency} + {args.series} series of {args.slices} x {args.size}²,"
              f" {os.cpu_count()} CPU cores (load average before: "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}), {args.threads} inference"
              f" thread(s) per process, device {args.device}", flush=True)
        results = {}
        for setup in args.setups.split(","):
            workers = 0 if setup == "embedded" else int(setup)
            results[setup] = run_setup(root / f"run-{setup}", workers, series, args.latency,
                                       args)
            r = results[setup]
            parts = "  ".join(f"{k}={v:.2f}" for k, v in r.items()
                              if k.endswith("_s") and k not in ("latency_s",
                                                                "throughput_span_s"))
            print(f"{setup:>8}: latency {r['latency_s']:.2f} s/series  {parts}  throughput"
                  f" {r['series_per_hour']:.0f} series/h ({r['throughput_series']} series in"
                  f" {r['throughput_span_s']:.1f} s)", flush=True)
        if "embedded" in results:
            e = results["embedded"]
            for setup, r in results.items():
                if setup != "embedded":  # the parts outside the run itself, either way
                    path = (r["complete_to_dispatched_s"] + r["dispatched_to_started_s"]
                            + r["finished_to_archived_s"])
                    own = e["complete_to_started_s"] + e["run_to_archived_s"]
                    print(f"cluster overhead with {setup} worker(s): latency"
                          f" {r['latency_s'] - e['latency_s']:+.2f} s/series; outside the run"
                          f" {path:.2f} s against the embedded {own:.2f} s:"
                          f" {path - own:+.2f} s/series (target <= 1 s)")
        if "1" in results and "2" in results:
            ratio = results["2"]["series_per_hour"] / results["1"]["series_per_hour"]
            print(f"2 workers / 1 worker: {ratio:.2f} x series/hour (target >= 1.6 x where"
                  " the machine has the cores)")
        print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
