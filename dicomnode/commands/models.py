"""``dicomnode models list``: the model folders the node can use."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomnode.commands import add_config_option
from dicomnode.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models in models_dir",
                       description="Model folders (models_dir/NAME/model.json + weights).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="one model a line: name, version, domains, sha256"
                            " prefix (tab-separated)")
    add_config_option(ls)
    ls.add_argument("--models-dir", type=Path, help="look here instead of [node] models_dir")
    ls.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.errors import ModelError
    from pipelines.model_folder import list_model_folders
    models_dir = args.models_dir or load_config(args.config).node.models_dir
    found = list_model_folders(models_dir)
    if not found:
        print(f"no models in {models_dir}", file=sys.stderr)
    broken = 0
    for entry in found:
        if isinstance(entry, ModelError):
            broken += 1
            print(f"broken model folder: {entry}", file=sys.stderr)
            continue
        print(f"{entry.name}\t{entry.version}\t{entry.domains}\t{entry.weights_sha256[:12]}")
    return 1 if broken else 0
