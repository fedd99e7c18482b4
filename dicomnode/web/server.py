"""uvicorn in a thread of the node: bound before recovery (a taken port stops the start),
serving until the node stops, HTTPS with the node's ``[tls]`` certificate when it has one.

uvicorn's own logs go through the node's JSON logging (warnings and up); each request
is logged at debug level by :func:`dicomnode.web.app.build_app`.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from dicomnode.config import Config
from dicomnode.errors import UserError
from dicomnode.log import get_logger

log = get_logger("web")


def _tls_context(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]
                 ) -> ssl.SSLContext:
    """uvicorn's server context for the node's certificate, TLS 1.2 at least (as DICOM's)."""
    context = default()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class WebServer:
    """The node's HTTP server: :meth:`bind` (in the caller), :meth:`start`, :meth:`stop`."""

    def __init__(self, config: Config) -> None:
        assert config.web is not None
        self.config = config
        self.web = config.web
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._app: Any = None
        self._grace = 0.0

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls.listening else "http"

    def bind(self) -> None:
        """Take the listening address now, so a taken port is one clear error at start."""
        host, port = self.web.host, self.web.port
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"[web] cannot listen on {host}:{port}:"
                            f" {exc.strerror or exc}") from None
        self._socket = sock

    def start(self, app: ASGIApp, grace: float) -> None:
        """Serve ``app`` on the bound socket; returns once it accepts connections."""
        tls = self.config.tls
        server = uvicorn.Server(uvicorn.Config(
            app, log_config=None, access_log=False, http="h11", loop="asyncio",
            lifespan="off", proxy_headers=False, server_header=False,
            ssl_certfile=tls.certificate or None, ssl_keyfile=tls.private_key or None,
            ssl_context_factory=_tls_context if tls.listening else None))
        assert self._socket is not None
        self._server, self._app, self._grace = server, app, grace
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self._socket]},
                                        name="WebServer", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not server.started:
            raise UserError(f"[web] the HTTP server did not start on {self.url}")
        log.info("web_listening", url=self.url, authentication=self.web.authenticates)

    @property
    def url(self) -> str:
        host = f"[{self.web.host}]" if ":" in self.web.host else self.web.host
        return f"{self.scheme}://{host}:{self.web.port}/"

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace), close. Idle
        keep-alive connections are not waited for (a TLS one would hold the stop for the
        peer's close_notify)."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            deadline = time.monotonic() + self._grace
            while self._app.state.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
            self._server.force_exit = True
            self._thread.join()
        if self._socket is not None:
            self._socket.close()
