"""``dicomnode reprocess``: harmonise series again, on an operator's request.

A job that failed for a reason that has gone since (a model folder fixed, the disk freed)
is not retried by itself; this queues a new one. The derived series has the same UIDs as
before, so what was already sent and confirmed is not sent again. A running node picks
the jobs up at once; a stopped one when it starts.
"""

from __future__ import annotations

import argparse

from dicomnode.commands import add_config_option, existing_index
from dicomnode.config import load_config
from dicomnode.dispatch.rollup import SEND_ERROR_PREFIX
from dicomnode.errors import UserError
from dicomnode.log import configure, get_logger
from dicomnode.store.index import Index, SeriesState

log = get_logger("reprocess")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reprocess", help="harmonise series again (new jobs)",
                       description="Queue a new harmonisation job for one original series,"
                       " or for every series whose harmonisation failed. Failed sends are"
                       " 'dicomnode resend --failed'.")
    add_config_option(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--series", metavar="UID", help="an original series")
    which.add_argument("--failed", action="store_true",
                       help="every original series whose harmonisation failed")
    p.set_defaults(func=run)


def failed_harmonisations(index: Index) -> list[str]:
    """Original series that failed in their job (not in a send, which resend retries)."""
    return [r["series_uid"] for r in index.all_series(kind="original")
            if r["state"] == SeriesState.FAILED
            and not (r["error"] or "").startswith(SEND_ERROR_PREFIX)]


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure("warning")
    index = existing_index(config)
    uids = failed_harmonisations(index) if args.failed else [args.series.strip()]
    queued = 0
    for uid in uids:
        why = index.reprocess(uid)
        if why is None:
            queued += 1
            log.info("reprocess_requested", series_uid=uid)
        elif not args.failed:
            raise UserError(f"series {uid} {why}")
    print(f"{queued} series queued for harmonisation")
    return 0
