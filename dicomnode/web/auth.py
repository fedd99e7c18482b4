"""Who is asking: HTTP Basic or Bearer against ``[web] users``, and forms that change state
only when they come from a page the node served.

Without users (a loopback-only console) every request is let in as ``local``. With users,
every request but the probes (``/healthz``, ``/readyz``) must authenticate; a refusal is
401 with a Basic challenge, logged without the secret. A secret is verified (pbkdf2, slow
on purpose) once per process: what was verified is remembered by its sha256.

A state-changing form (resend, reprocess) carries a token: an HMAC of the action, the
series and the user under a key made at start-up, which only a page of this node can have
served; a request whose Origin header names another site is refused as well. A page on
another site cannot make a logged-in browser resend anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from typing import Any

import anyio
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomnode.credentials import Credential
from dicomnode.log import get_logger

log = get_logger("web")

LOCAL_USER = "local"  # who the audit log names when the console asks no one
PROBES = frozenset({"/healthz", "/readyz"})
_REMEMBERED = 1024  # verified secrets kept (by digest); the cache is emptied when full


class Authenticate:
    """ASGI middleware: sets ``scope["state"]["user"]``, or answers 401."""

    def __init__(self, app: ASGIApp, users: Sequence[Credential]) -> None:
        self.app, self.users = app, tuple(users)
        self._verified: dict[bytes, str] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user: str | None = LOCAL_USER
        if self.users and scope["path"] not in PROBES:
            header = Headers(scope=scope).get("authorization", "")
            user = await anyio.to_thread.run_sync(self.user, header)
            if user is None:
                client = scope.get("client") or ("?", 0)
                log.warning("web_auth_refused", client=f"{client[0]}:{client[1]}",
                            path=scope["path"], presented=header.split(" ", 1)[0] or None)
                await PlainTextResponse("authentication required\n", 401, headers={
                    "WWW-Authenticate": 'Basic realm="dicomnode", charset="UTF-8"'})(
                    scope, receive, send)
                return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)

    def user(self, header: str) -> str | None:
        """The user an Authorization header proves, or None."""
        key = hashlib.sha256(header.encode()).digest()
        if key in self._verified:
            return self._verified[key]
        scheme, _, value = header.partition(" ")
        found = None
        if scheme.lower() == "basic":
            try:
                name, _, secret = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            found = next((u.name for u in self.users if u.name == name and u.verify(secret)),
                         None)
        elif scheme.lower() == "bearer" and value:
            found = next((u.name for u in self.users if u.verify(value.strip())), None)
        if found is not None:
            if len(self._verified) >= _REMEMBERED:
                self._verified.clear()
            self._verified[key] = found
        return found


def user_of(request: Request) -> str:
    return request.state.user


def client_of(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "?"


class FormTokens:
    """Tokens for the console's state-changing forms (module docstring)."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def make(self, request: Request, action: str, target: str) -> str:
        message = f"{action}\0{target}\0{user_of(request)}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def check(self, request: Request, action: str, target: str, token: Any) -> str | None:
        """None when the form may act, else why not."""
        origin = request.headers.get("origin")
        if origin and origin != f"{request.url.scheme}://{request.url.netloc}":
            return f"the form came from {origin}, not from this console"
        if not isinstance(token, str) or not hmac.compare_digest(
                token, self.make(request, action, target)):
            return "the form has expired (the node restarted) or was not made by this console"
        return None
