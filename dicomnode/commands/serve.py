"""``dicomnode serve``: run the node in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import signal
import threading

from dicomnode import log as logs
from dicomnode.commands import add_config_option
from dicomnode.config import load_config
from dicomnode.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the node (C-STORE in, harmonise, send, Q/R)",
                       description="Run the DICOM node in the foreground. SIGTERM or SIGINT"
                       " stops accepting, lets in-flight work finish or persists it, exits 0."
                       " SIGHUP reads the config again: routes' models apply from the next"
                       " job.")
    add_config_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicomnode.node import Node  # loads torch: only when serving
    config = load_config(args.config)
    logs.configure(config.node.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node = Node(config)  # locks data_dir: a second node on it stops here, changing nothing
    signal.signal(signal.SIGHUP, lambda *_: node.reload())  # routes' models, without a restart
    try:
        node.start()  # checks it can listen before recovering anything
    except OSError as exc:  # e.g. a spool folder it may not read
        raise UserError(f"cannot start: {exc.strerror or exc}"
                        f"{f': {exc.filename}' if exc.filename else ''}") from None
    stop.wait()
    node.stop()
    return 0
