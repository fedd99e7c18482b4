"""``dicomnode evaluate``: metrics (docs/interface.md) of a model on source/target series, JSON
on stdout."""

from __future__ import annotations

import argparse
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
                       " (paired data), radiomics_ccc per feature class, domain_accuracy of a"
                       " scanner classifier, and the same for histogram matching (baseline)."
                       " JSON on stdout, progress on stderr.")
    p.add_argument("--model", required=True, help="model name under models_dir, or a model"
                   " folder path")
    p.add_argument("--source", required=True, type=Path, help="folder of source series")
    p.add_argument("--target", required=True, type=Path, help="folder of target series")
    p.add_argument("--report", type=Path, help="write metrics.json and figures here")
    p.add_argument("--config", help="node config, for models_dir (default: $DICOMNODE_CONFIG"
                   " or conf/node.toml)")
    p.add_argument("--models-dir", type=Path, help="look here instead of [node] models_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    configure("warning")  # progress goes to stderr; stdout stays machine-readable
    from trainers.evaluate import EvaluationError, evaluate
    from trainers.report import json_ready

    folder = Path(args.model)
    if not (folder / "model.json").is_file():
        models_dir = args.models_dir or load_config(args.config).node.models_dir
        folder = Path(models_dir) / args.model
    if not (folder / "model.json").is_file():
        raise UserError(f"no model '{args.model}' ({folder} has no model.json)")
    try:
        metrics = evaluate(folder, args.source, args.target, args.report,
                           log=lambda m: print(m, file=sys.stderr))
    except (EvaluationError, PipelineError) as exc:
        raise UserError(str(exc)) from None
    print(json.dumps(json_ready(metrics), indent=2))
    return 0
