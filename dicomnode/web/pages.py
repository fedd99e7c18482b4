"""Rendering the console's pages: the Jinja2 templates (``web/templates``, autoescaped)
and the filters they format times, sizes and durations with."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from dicomnode import __version__

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")


def when(ts: float | None) -> str:
    """An epoch time as UTC, to the second."""
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"


def ago(ts: float | None) -> str:
    return "never" if not ts else f"{duration(time.time() - ts)} ago"


def size(count: float | None) -> str:
    value = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


for _name, _filter in (("when", when), ("duration", duration), ("ago", ago), ("size", size)):
    TEMPLATES.env.filters[_name] = _filter


def page(request: Request, template: str, status: int = 200, **values: Any) -> Response:
    ctx = request.app.state.ctx
    return TEMPLATES.TemplateResponse(request, template, {
        "node": ctx.config.node, "user": request.state.user, "version": __version__,
        **values}, status_code=status)


def not_found(request: Request, message: str) -> Response:
    return page(request, "message.html", 404, title="Not found", message=message)
