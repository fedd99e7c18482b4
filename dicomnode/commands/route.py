"""``dicomnode route``: which route each series under a folder takes, and why."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicomnode.commands import add_config_option
from dicomnode.config import load_config
from dicomnode.errors import UserError
from pipelines.routing import Route, route_series
from pipelines.series import SeriesError, find_series, harmonisable_images, read_headers


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("route", help="show the route each series under DIR takes",
                       description="For every series found under DIR, print the route it"
                       " matches (or none); with --explain, why each rule did or did not.")
    p.add_argument("dir", metavar="DIR", help="folder with DICOM files (searched recursively)")
    p.add_argument("--explain", action="store_true",
                   help="also print every rule's verdict, condition by condition")
    add_config_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    root = Path(args.dir)
    if not root.exists():
        raise UserError(f"{root}: no such file or folder")
    groups = find_series(root)
    if not groups:
        raise UserError(f"{root}: no DICOM series found")
    if not config.routes:
        print(f"note: {config.path} has no [[routes]]; every series is unmatched")
    for uid, files in groups.items():
        try:
            headers = read_headers(files)
        except SeriesError as exc:
            print(f"{uid}: unreadable: {exc}")
            continue
        first = (harmonisable_images(headers) or headers)[0]  # a raw data object has no label
        decision = route_series(headers, config.routes)
        verdict = decision.summary()
        if decision.route is None and not decision.flagged:
            verdict += f" (unmatched = {config.node.unmatched})"
        label = f"{first.get('Modality', '?')} '{first.get('SeriesDescription', '')}'"
        print(f"{uid}  {label}  ({len(files)} instances): {verdict}")
        if args.explain:
            for line in decision.explain():
                print(line)
            if decision.route is not None and decision.route.target_domain:
                print(_target_domain(decision.route, config.node.models_dir))
    return 0


def _target_domain(route: Route, models_dir: Path) -> str:
    """What the route's multi-domain model converts a series to, from its model folder."""
    from pipelines.errors import ModelError
    from pipelines.model_folder import read_model_info
    try:
        domain = read_model_info(models_dir / route.model).target_style(route.target_domain)
    except ModelError as exc:
        return f"  ! target domain {route.target_domain}: {exc}"
    assert domain is not None
    tags = ", ".join(f"{k}={v}" for k, v in domain.tags.items())
    return (f"  -> converted to domain {domain.name} (model {route.model}: reference style of"
            f" {domain.series} training series; {tags}), whatever scanner it came from")
