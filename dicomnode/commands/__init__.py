"""``dicomnode`` sub-commands, one module each (see ``dicomnode.cli``)."""

from __future__ import annotations

import argparse

from dicomnode.config import Config
from dicomnode.errors import UserError
from dicomnode.store.index import Index


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """The ``--config`` option every command that reads the node's config takes."""
    parser.add_argument("--config", help="config file (default: $DICOMNODE_CONFIG or"
                        " conf/node.toml)")


def existing_index(config: Config) -> Index:
    """The node's index, for a command that reads or steers what the node holds; a user
    error where the node has not run with this config yet (nothing to show or change)."""
    if not config.index_path.exists():
        raise UserError(f"no index at {config.index_path}: the node has not run with this"
                        " config yet")
    return Index(config.index_path)
