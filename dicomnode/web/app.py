"""The web app factory: console pages, the viewer, /metrics and probes, DICOMweb, behind
authentication (:mod:`.auth`); each request logged at debug level."""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomnode.config import Config
from dicomnode.log import get_logger
from dicomnode.store.index import Index
from dicomnode.web import console, dicomweb, health, viewer
from dicomnode.web.auth import Authenticate
from dicomnode.web.context import WebContext

log = get_logger("web")
# Names a loopback console answers to: another name (a site resolving its own name to
# 127.0.0.1, DNS rebinding) gets 400, so a page elsewhere cannot use the open console
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]


class RequestLog:
    """One debug event per request: method, path (UIDs; never the query, which may hold
    a patient's name in QIDO-RS), status, milliseconds, client. Counts the requests in
    flight (``app.state.in_flight``): stopping waits for those, not for idle connections."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), {}
        state = scope["app"].state
        state.in_flight += 1

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            state.in_flight -= 1
        client = scope.get("client") or ("?", 0)
        log.debug("http_request", method=scope["method"], path=scope["path"],
                  status=status.get("code"), ms=round((time.perf_counter() - started) * 1000, 1),
                  client=f"{client[0]}:{client[1]}")


def build_app(config: Config, index: Index, listening: Callable[[], bool]) -> Starlette:
    """The ASGI app of a node with ``[web]``."""
    assert config.web is not None
    web = config.web
    middleware = [Middleware(RequestLog)]
    if not web.authenticates:
        middleware.append(Middleware(TrustedHostMiddleware,
                                     allowed_hosts=[*LOOPBACK_NAMES, web.host]))
    middleware.append(Middleware(Authenticate, users=web.users))
    app = Starlette(routes=[*health.ROUTES, *viewer.ROUTES, *console.ROUTES,
                            *dicomweb.ROUTES], middleware=middleware)
    app.state.ctx = WebContext(config, index, listening)
    app.state.in_flight = 0
    return app
