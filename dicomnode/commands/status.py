"""``dicomnode status``: what the node has received, queued, harmonised, sent or failed."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from dicomnode.commands import add_config_option, existing_index
from dicomnode.config import load_config
from dicomnode.dispatch.rollup import send_error
from dicomnode.store import commitments, sends


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="series received/queued/harmonised/sent/failed",
                       description="Show every series in the node's index with its state.")
    add_config_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    index = existing_index(config)
    rows = index.all_series()
    sent, send_errors = sends.summary(index), sends.last_errors(index)
    jobs = index.last_jobs()  # who ran each series' latest job, with which model version
    series = [{"series_uid": r["series_uid"], "state": r["state"], "instances": r["instances"],
               "route": r["route"], "error": r["error"], "note": r["note"], "kind": r["kind"],
               "modality": r["modality"], "source_series_uid": r["source_series_uid"],
               "sends": sent.get(r["series_uid"], {}),
               "send_error": send_error(*send_errors[r["series_uid"]])
               if r["series_uid"] in send_errors else None,
               "worker": jobs[r["series_uid"]]["worker"] if r["series_uid"] in jobs else None,
               "model_version": jobs[r["series_uid"]]["model"] if r["series_uid"] in jobs
               else None} for r in rows]
    requests = commitments.summary(index)
    if args.json:
        print(json.dumps({"series": series, "commitments": requests}, indent=2))
        return 0
    counts = Counter(s["state"] for s in series)
    print("  ".join(f"{state}: {n}" for state, n in sorted(counts.items())) or "no series")
    if requests["states"]:
        error = requests["last_error"]
        print("storage commitment requests: " + ", ".join(
            f"{n} {state}" for state, n in sorted(requests["states"].items()))
            + (f"  error={error}" if error else ""))
    for s in series:
        extra = f"  route={s['route']}" if s["route"] else ""
        for dest, counts in s["sends"].items():
            extra += f"  {dest}: " + ", ".join(f"{n} {state}" for state, n in
                                                sorted(counts.items()))
        error = s["error"] or s["send_error"]
        extra += f"  error={error}" if error else ""
        extra += f"  worker={s['worker']}" if s["worker"] and s["state"] in (
            "processing", "failed") else ""
        extra += f"  note={s['note']}" if s["note"] else ""
        print(f"{s['state']:<11} {s['instances']:>5}  {s['modality'] or '-':<3} {s['kind']:<8}"
              f" {s['series_uid']}{extra}")
    return 0
