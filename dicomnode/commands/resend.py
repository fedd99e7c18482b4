"""``dicomnode resend``: send harmonised instances again, on an operator's explicit request.

The outbox never sends a confirmed instance twice by itself; this command re-queues
rows (sent, failed or still pending) in the node's index. A running node picks them up
at its next poll; a stopped one when it starts.
"""

from __future__ import annotations

import argparse

from dicomnode.commands import add_config_option, existing_index
from dicomnode.config import load_config
from dicomnode.dispatch import outbox
from dicomnode.errors import UserError
from dicomnode.log import configure
from dicomnode.store.sends import SendState


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resend", help="send harmonised series to their peers again",
                       description="Queue harmonised instances for C-STORE again: one series"
                       " (its derived series UID, or the UID of the original it came from),"
                       " or every failed send. With --to, a series goes to that peer even if"
                       " its route never sent it there.")
    add_config_option(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--series", metavar="UID", help="a derived series, or an original"
                       " whose harmonised copies should be sent again")
    which.add_argument("--failed", action="store_true", help="every send that failed")
    p.add_argument("--to", metavar="AE", help="only this destination peer (AE title)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure("warning")
    to = args.to.strip() if args.to else None
    if to is not None and (config.peer(to) is None or config.peer(to).port is None):
        raise UserError(f"--to {to}: not a peer with a port in [[peers]] of {config.path}")
    index = existing_index(config)
    if args.failed:
        total = outbox.resend(index, destination=to, states=(SendState.FAILED,))
    else:
        total = outbox.resend_series(index, args.series.strip(), to)
    print(f"{total} instance send(s) queued")
    return 0
