"""DICOMweb under ``/dicomweb`` (PS3.18): QIDO-RS (:mod:`.qido`), WADO-RS (:mod:`.wado`)
and STOW-RS (:mod:`.stow`), over the same index, matching, files and receive path as
C-FIND, C-GET and C-STORE. Like an association, a request must come from a configured
peer's address or, with ``accept_any_loopback``, from loopback (and authenticate where
``[web] users`` are set, as every request then must)."""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from dicomnode.log import get_logger
from dicomnode.net.policy import host_allowed
from dicomnode.web.dicomweb import qido, stow, wado
from dicomnode.web.dicomweb.common import PREFIX, problem

log = get_logger("dicomweb")


class AllowList:
    """ASGI middleware of the /dicomweb mount: the ``[[peers]]`` address allow-list."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        host = request.client.host if request.client else ""
        refused = host_allowed(request.app.state.ctx.config, host)
        if refused is not None:
            log.warning("dicomweb_refused", client=host, path=scope["path"], reason=refused)
            await problem(403, refused)(scope, receive, send)
            return
        await self.app(scope, receive, send)


ROUTES = [Mount(PREFIX, routes=[*qido.ROUTES, *wado.ROUTES, *stow.ROUTES],
                middleware=[Middleware(AllowList)])]
