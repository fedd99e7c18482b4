"""``dicomnode harmonise IN OUT``: route and harmonise every series under IN, offline."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dicomnode.commands import add_config_option
from dicomnode.config import load_config
from dicomnode.errors import UserError
from dicomnode.log import configure
from pipelines.errors import one_line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("harmonise", help="harmonise every series under IN into OUT (offline)",
                       description="Route and harmonise every series under IN; write the"
                       " derived series under OUT/<derived series UID>/. Exit status 1 when"
                       " any series is rejected or fails, with one line each on stderr.")
    p.add_argument("input", metavar="IN", help="folder with DICOM files (searched recursively)")
    p.add_argument("output", metavar="OUT", help="folder for the derived series")
    add_config_option(p)
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--route", metavar="NAME", help="use this route for every series")
    choice.add_argument("--model", metavar="NAME", help="use this model for every series,"
                        " without routing")
    p.add_argument("--target-domain", metavar="NAME", help="with --model, for a multi-domain"
                   " model: the domain to convert every series to (a route names its own)")
    p.add_argument("--sr", action="store_true", help="also write an algorithm Structured"
                   " Report (TID 1500 with TID 4019) per derived series, under OUT/<SR series"
                   " UID>/")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.harmonise import EXECUTION_CACHE, harmonise_series
    from pipelines.model_folder import MODEL_JSON
    from pipelines.series import find_series
    config = load_config(args.config)
    configure("warning")
    source = Path(args.input)
    if not source.exists():
        raise UserError(f"{source}: no such file or folder")
    if args.route and args.route not in {r.name for r in config.routes}:
        raise UserError(f"no route named '{args.route}' in {config.path} (known: "
                        f"{', '.join(r.name for r in config.routes) or 'none'})")
    if args.target_domain and not args.model:
        raise UserError("--target-domain goes with --model (a route names its own"
                        " target_domain)")
    models_dir = config.node.models_dir
    if args.model and not (models_dir / args.model / MODEL_JSON).is_file():
        raise UserError(f"no model '{args.model}' in {models_dir}")
    groups = find_series(source)
    if not groups:
        raise UserError(f"{source}: no DICOM series found")
    # the node's own precision decisions where it runs here: the same bytes as the node writes
    data_dir = config.node.data_dir
    ours = data_dir.is_dir() and os.access(data_dir, os.W_OK)
    execution_cache = data_dir / EXECUTION_CACHE if ours else None
    failures = 0
    for uid, files in groups.items():
        try:
            outcome = harmonise_series(files, routes=config.routes, models_dir=models_dir,
                                       out_dir=Path(args.output), options=config.inference,
                                       route_name=args.route, model_name=args.model,
                                       sr=args.sr, execution_cache=execution_cache,
                                       target_domain=args.target_domain)
        except Exception as exc:  # one series' failure, whatever it is, must not stop the rest
            failures += 1
            print(f"{uid}: failed: {one_line(exc)}", file=sys.stderr)
            continue
        if outcome.status == "harmonised":
            report = f" (report {outcome.report.parent.name})" if outcome.report else ""
            print(f"{uid}: harmonised -> {outcome.derived_series_uid}{report}: {outcome.reason}")
        elif outcome.status == "unmatched":
            print(f"{uid}: unmatched: {outcome.reason} (left out)")
        else:
            failures += 1
            print(f"{uid}: rejected: {outcome.reason}", file=sys.stderr)
    return 1 if failures else 0
