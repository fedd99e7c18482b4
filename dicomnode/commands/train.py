"""``dicomnode train paired|unpaired|synthetic|site``: train a generator, write a model folder."""

from __future__ import annotations

import argparse

from dicomnode.config import load_config
from dicomnode.errors import UserError
from dicomnode.log import configure
from pipelines.errors import PipelineError
from trainers.options import (
    PairedOptions,
    SiteOptions,
    SyntheticOptions,
    UnpairedOptions,
    add_arguments,
    from_args,
)

MODES = {
    "paired": (PairedOptions, "paired residual CNN / U-Net: the same raw data in two kernels,"
               " series matched by FrameOfReferenceUID and slice position"),
    "unpaired": (UnpairedOptions, "CycleGAN (LSGAN or WGAN-GP, cycle, identity, optional SSIM,"
                 " CBAM and Gram texture loss) on two unpaired sets of series"),
    "synthetic": (SyntheticOptions, "MR: fit the source scanner's acquisition (contrast curve,"
                  " k-space window, receiver noise) on two unpaired sets of series, synthesise"
                  " source series from the target ones, train the paired recipe on them and"
                  " give back the target scanner's grain"),
    "site": (SiteOptions, "retrain a route's model from the node's own spool: the route's"
             " match selects source series, its target table the reference series; writes a"
             " new version next to the deployed one and compares them on held-out series"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a generator (paired, unpaired, synthetic, or per site)",
                       description="Train a harmonisation generator and write"
                       " models_dir/NAME (model.json, weights, report/).")
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, (cls, text) in MODES.items():
        m = modes.add_parser(mode, help=text, description=text)
        if mode != "site":
            m.add_argument("--config", help="node config, for its models_dir (default:"
                           " $DICOMNODE_CONFIG or conf/node.toml)")
        # site derives the data, name and version from the route and the deployed model
        add_arguments(m, cls, skip={"source", "target", "name", "version", "force"}
                      if mode == "site" else None)
        if mode == "site":
            m.add_argument("--cluster", action="store_true", help="run it on a worker of the"
                           " node's [cluster] train_queue (the node must be running); waits"
                           " for the new model folder")
        m.set_defaults(func=run, models_dir=None)


def run(args: argparse.Namespace) -> int:
    from trainers.modes import TRAIN_SERIES
    from trainers.site import train_site
    from trainers.train import TrainingError, train_folders

    configure("warning")  # progress goes to stderr; stdout stays machine-readable
    cls = MODES[args.mode][0]
    config = None
    if args.models_dir is None or args.mode == "site":
        config = load_config(args.config)
        args.models_dir = args.models_dir or config.node.models_dir
    options = from_args(cls, args)
    try:
        if args.mode == "site" and args.cluster:
            from dicomnode.cluster.training import train_on_cluster
            assert config is not None
            print(train_on_cluster(config, options))
            return 0
        if args.mode == "site":
            assert config is not None
            outcome = train_site(options, routes=config.routes,
                                 spool=config.spool_dir, models_dir=args.models_dir)
        else:
            outcome = train_folders(options, TRAIN_SERIES[args.mode])
    except (TrainingError, PipelineError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    print(outcome.folder)
    return 0
