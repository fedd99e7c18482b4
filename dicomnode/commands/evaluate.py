"""``dicomnode evaluate``: metrics (docs/interface.md) of a model on source/target series (or a
multi-domain model on every ordered pair of ``--domain`` folders), JSON on stdout."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from dicomnode.config import load_config
from dicomnode.errors import UserError
from dicomnode.log import configure
from pipelines.errors import PipelineError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of a model on held-out series (JSON)",
                       description="Harmonise every series under --source with the model, as"
                       " the node would, and compare with --target: psnr, ssim, rmse, ncc"
                       " (paired data), radiomics_ccc per feature class, reproducible_share"
                       " (CCC >= 0.85), feature_stats (Levene, Welch, Cohen's d),"
                       " downstream_dice (tissue segmentation fitted on the target),"
                       " domain_accuracy of a scanner classifier, and the same for histogram"
                       " matching (baseline). With --domain NAME=DIR (repeatable), a"
                       " multi-domain model on every ordered pair of those domains, an N-way"
                       " scanner classifier and one table. JSON on stdout, progress on stderr.")
    p.add_argument("--model", required=True, help="model name under models_dir, or a model"
                   " folder path")
    p.add_argument("--source", type=Path, help="folder of source series")
    p.add_argument("--target", type=Path, help="folder of target series")
    p.add_argument("--target-domain", help="a multi-domain model: the domain to convert"
                   " --source to")
    p.add_argument("--domain", action="append", type=_domain, metavar="NAME=DIR",
                   help="a multi-domain model's domain and a folder of its series (repeatable;"
                   " instead of --source/--target)")
    p.add_argument("--report", type=Path, help="write metrics.json and figures here")
    p.add_argument("--config", help="node config, for models_dir (default: $DICOMNODE_CONFIG"
                   " or conf/node.toml)")
    p.add_argument("--models-dir", type=Path, help="look here instead of [node] models_dir")
    p.set_defaults(func=run)


def _domain(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(folder)


def run(args: argparse.Namespace) -> int:
    configure("warning")  # progress goes to stderr; stdout stays machine-readable
    from trainers.evaluate import EvaluationError, evaluate
    from trainers.evaluate_domains import evaluate_folders
    from trainers.report import json_ready

    if bool(args.domain) == bool(args.source or args.target):
        raise UserError("give either --source and --target, or --domain NAME=DIR (twice or"
                        " more)")
    if not args.domain and not (args.source and args.target):
        raise UserError("--source and --target go together")

    folder = Path(args.model)
    if not (folder / "model.json").is_file():
        models_dir = args.models_dir or load_config(args.config).node.models_dir
        folder = Path(models_dir) / args.model
    if not (folder / "model.json").is_file():
        raise UserError(f"no model '{args.model}' ({folder} has no model.json)")
    log = functools.partial(print, file=sys.stderr)
    try:
        if args.domain:
            metrics = evaluate_folders(folder, dict(args.domain), args.report, log=log)
        else:
            metrics = evaluate(folder, args.source, args.target, args.report, log=log,
                               target_domain=args.target_domain)
    except (EvaluationError, PipelineError) as exc:
        raise UserError(str(exc)) from None
    print(json.dumps(json_ready(metrics), indent=2))
    return 0
