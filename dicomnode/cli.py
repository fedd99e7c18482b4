"""The ``dicomnode`` console script: one sub-command per module in ``dicomnode.commands``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from dicomnode import __version__
from dicomnode.config import ConfigError
from dicomnode.errors import UserError

# Each module defines ``register(subparsers)`` which adds its parser with ``func=run``;
# heavy dependencies (torch) are imported inside ``run`` so --help and status start fast.
COMMANDS = (
    "simulate",
    "serve",
    "worker",
    "status",
    "echo",
    "resend",
    "reprocess",
    "route",
    "harmonise",
    "models",
    "train",
    "evaluate",
    "web",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description="A DICOM node that harmonises CT and MR images across scanners.")
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"dicomnode.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError) as exc:
        print(f"dicomnode {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into e.g. head: not an error worth a traceback
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
