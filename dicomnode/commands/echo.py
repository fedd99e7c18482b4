"""``dicomnode echo``: can the node reach its peers? C-ECHO from the node's own AE.

What a PACS administrator checks first when harmonised series do not arrive: the peer's
address, port, AE title and (for ``tls = true`` peers) certificates, exactly as the node
itself will use them, without starting it.
"""

from __future__ import annotations

import argparse
import time

from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from dicomnode.commands import add_config_option
from dicomnode.config import Config, Peer, load_config
from dicomnode.errors import UserError
from dicomnode.log import configure
from dicomnode.net.peer import Unreachable, peer_association
from dicomnode.net.status import SUCCESS, response_status


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("echo", help="C-ECHO configured peers from the node's AE",
                       description="Open an association to each named [[peers]] entry (all"
                       " with a port when none is named), as the node does (its AE title,"
                       " TLS where the peer has tls = true), and send C-ECHO. Exit status 1"
                       " when any peer does not answer Success.")
    p.add_argument("peers", nargs="*", metavar="AE", help="peer AE titles (default: all)")
    add_config_option(p)
    p.set_defaults(func=run)


def echo(config: Config, peer: Peer) -> str | None:
    """None when ``peer`` answers C-ECHO with Success, else why not."""
    try:
        with peer_association(config, peer, [build_context(Verification)]) as assoc:
            code = response_status(assoc.send_c_echo())
    except Unreachable as exc:
        return str(exc)
    except (OSError, ValueError) as exc:
        return f"cannot connect: {exc}"
    if code != SUCCESS:
        return "no C-ECHO response" if code is None else f"C-ECHO status 0x{code:04X}"
    return None


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure("warning")  # pynetdicom's own reason (connection refused, TLS) as JSON on stderr
    if args.peers:
        peers = []
        for title in args.peers:
            peer = config.peer(title)
            if peer is None:
                raise UserError(f"{title} is not a [[peers]] entry in {config.path}")
            if peer.port is None:
                raise UserError(f"{title} has no port in {config.path}")
            peers.append(peer)
    else:
        peers = [p for p in config.peers if p.port is not None]
        if not peers:
            raise UserError(f"no [[peers]] entry with a port in {config.path}")
    failed = 0
    for peer in peers:
        where = f"{peer.ae_title} at {peer.host}:{peer.port}{' (TLS)' if peer.tls else ''}"
        start = time.perf_counter()
        problem = echo(config, peer)
        if problem is None:
            print(f"{where}: ok ({(time.perf_counter() - start) * 1000:.0f} ms)")
        else:
            failed += 1
            print(f"{where}: FAILED: {problem}")
    return 1 if failed else 0
