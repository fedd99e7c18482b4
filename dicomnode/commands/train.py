"""``dicomnode train paired|unpaired|synthetic|multidomain|site``: train a generator, write a
model folder."""

from __future__ import annotations

import argparse

from dicomnode.config import load_config
from dicomnode.errors import UserError
from dicomnode.log import configure
from pipelines.errors import PipelineError
from trainers.modes import MODES
from trainers.options import add_arguments, from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a generator (paired, unpaired, synthetic,"
                       " multidomain, or per site)",
                       description="Train a harmonisation generator and write"
                       " models_dir/NAME (model.json, weights, report/).")
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, entry in MODES.items():
        m = modes.add_parser(mode, help=entry.help, description=entry.help)
        if mode != "site":
            m.add_argument("--config", help="node config, for its models_dir (default:"
                           " $DICOMNODE_CONFIG or conf/node.toml)")
        add_arguments(m, entry.options, skip=entry.skip)
        if mode == "site":
            m.add_argument("--cluster", action="store_true", help="run it on a worker of the"
                           " node's [cluster] train_queue (the node must be running); waits"
                           " for the new model folder")
        m.set_defaults(func=run, models_dir=None)


def run(args: argparse.Namespace) -> int:
    from trainers.site import train_site
    from trainers.train import TrainingError, train_folders

    configure("warning")  # progress goes to stderr; stdout stays machine-readable
    mode = MODES[args.mode]
    config = None
    if args.models_dir is None or args.mode == "site":
        config = load_config(args.config)
        args.models_dir = args.models_dir or config.node.models_dir
    options = from_args(mode.options, args)
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
            outcome = train_folders(options, mode.train_series())
    except (TrainingError, PipelineError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    print(outcome.folder)
    return 0
