"""``dicomnode web user NAME``: a ``[web] users`` entry for the web console.

The config keeps a salted hash only; the secret is printed once, here, and never stored.
"""

from __future__ import annotations

import argparse
import sys

from dicomnode.credentials import entry, new_secret
from dicomnode.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("web", help="web console set-up (users)",
                       description="Set-up of the web console ([web] in the config).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    user = actions.add_parser("user", help="make a [web] users entry",
                              description="Print a [web] users entry (NAME and a salted"
                              " hash) for the config. The secret is a new random one,"
                              " printed once on stderr, unless --password-stdin reads it.")
    user.add_argument("name", metavar="NAME", help="who the audit log will name")
    user.add_argument("--password-stdin", action="store_true",
                      help="read the secret from the first line of standard input")
    user.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    name = args.name.strip()
    if not name or ":" in name or not name.isprintable() or len(name) > 64:
        raise UserError(f"user name {args.name!r}: 1-64 printable characters, no colon")
    if args.password_stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
        if len(secret) < 12:
            raise UserError("the secret read from stdin is shorter than 12 characters")
    else:
        secret = new_secret()
        print(f"secret for {name} (shown once; Basic password or Bearer token): {secret}",
              file=sys.stderr)
    print(f'"{entry(name, secret)}"')
    return 0
