"""``dicomnode`` sub-commands, one module each (see ``dicomnode.cli``)."""

from __future__ import annotations

import argparse


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """The ``--config`` option every command that reads the node's config takes."""
    parser.add_argument("--config", help="config file (default: $DICOMNODE_CONFIG or"
                        " conf/node.toml)")
