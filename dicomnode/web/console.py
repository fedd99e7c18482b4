"""The console's pages: overview, series list, one series (with resend and re-harmonise,
confirmed), models and the audit log. Server-rendered; readable without JavaScript (the
overview refreshes itself where it runs)."""

from __future__ import annotations

import functools
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from dicomnode import metrics
from dicomnode.dispatch.outbox import resend_series
from dicomnode.errors import UserError
from dicomnode.log import get_logger
from dicomnode.store import browse
from dicomnode.store.browse import Cursor, SeriesFilter
from dicomnode.store.index import Index, SeriesState
from dicomnode.web.auth import client_of, user_of
from dicomnode.web.context import WebContext, context_of
from dicomnode.web.pages import not_found, page
from pipelines.model_folder import list_model_folders
from pipelines.routing import route_series
from pipelines.series import SeriesError, read_headers

log = get_logger("web")
HOUR = 3600.0
ACTIONS = {"resend": "Send the harmonised series to its peers again",
           "reprocess": "Harmonise the series again (a new job)"}


def _progress(job: Any, now: float) -> dict[str, Any]:
    """A running job's elapsed time and, from the seconds per instance of the series
    harmonised since the node started, an estimate of how far it is."""
    elapsed = now - job["claimed"]
    seconds = sum(metrics.values(metrics.HARMONISE_SECONDS).values())
    instances = sum(metrics.values(metrics.HARMONISED_INSTANCES).values())
    estimate = None
    if instances and job["instances"]:
        estimate = min(0.99, elapsed / (seconds / instances * job["instances"]))
    return {**dict(job), "elapsed": elapsed, "estimate": estimate}


def overview(request: Request) -> Response:
    ctx = context_of(request)
    index, now = ctx.index, time.time()
    contact = metrics.values(metrics.LAST_CONTACT)
    peers = [{"ae_title": p.ae_title, "host": p.host, "port": p.port,
              "last_in": contact.get((p.ae_title, "in")),
              **browse.peer_sends(index, p.ae_title)} for p in ctx.config.peers]
    destinations = [p.ae_title for p in ctx.config.peers]
    return page(request, "overview.html", states=browse.state_counts(index),
                queue=browse.queue_depth(index),
                running=[_progress(j, now) for j in browse.running_jobs(index)],
                hour=browse.throughput(index, now - HOUR, destinations), disk=ctx.disk(),
                errors=browse.recent_errors(index), peers=peers, audit=ctx.audit.latest(5),
                live=request.query_params.get("live") != "0", now=now)


def _day(text: str, end: bool = False) -> float | None:
    """A YYYY-MM-DD form field as the epoch time its UTC day starts (``end``: the next
    day's start); None when empty or unreadable."""
    try:
        day = date.fromisoformat(text.strip())
    except ValueError:
        return None
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    return start + 86400 if end else start


def series_list(request: Request) -> Response:
    ctx = context_of(request)
    q = request.query_params
    where = SeriesFilter(state=q.get("state", ""), route=q.get("route", ""),
                         modality=q.get("modality", "").strip().upper(), kind=q.get("kind", ""),
                         since=_day(q.get("from", "")), until=_day(q.get("to", ""), end=True))
    try:
        after = Cursor.parse(q["after"]) if q.get("after") else None
        before = Cursor.parse(q["before"]) if q.get("before") else None
    except ValueError:
        after = before = None
    rows = browse.series_page(ctx.index, where, after=after, before=before)
    keep = {k: v for k, v in q.items() if k not in ("after", "before") and v}
    pages = {}
    if rows and (after or before):
        pages["newer"] = {**keep, "before": Cursor(rows[0]["first_received"],
                                                   rows[0]["series_uid"]).text()}
    if len(rows) == browse.PAGE:
        pages["older"] = {**keep, "after": Cursor(rows[-1]["first_received"],
                                                  rows[-1]["series_uid"]).text()}
    return page(request, "series_list.html", rows=rows, total=browse.count_series(
        ctx.index, where), filters=q, pages=pages, states=list(SeriesState),
        routes=[r.name for r in ctx.config.routes])


@functools.lru_cache(maxsize=64)
def _explain(index: Index, routes: tuple, series_uid: str, instances: int,
             last_received: float) -> tuple[str, tuple[str, ...]]:
    """The route decision for a stored series and why (``dicomnode route --explain``),
    cached while its instances stay the same."""
    files = [index.path.parent / p for p in index.series_files(series_uid)]
    try:
        decision = route_series(read_headers(files), routes)
    except SeriesError as exc:
        return f"unreadable: {exc}", ()
    return decision.summary(), tuple(decision.explain())


def series_detail(request: Request) -> Response:
    ctx = context_of(request)
    uid = request.path_params["uid"]
    row = ctx.index.series(uid)
    if row is None:
        return not_found(request, f"series {uid} is not in the index")
    explanation = None
    if row["kind"] == "original" and row["instances"]:
        explanation = _explain(ctx.index, ctx.config.routes, uid, row["instances"],
                               row["last_received"])
    derived = [ctx.index.series(d) for d in ctx.index.derived_series(uid)]
    source = ctx.index.series(row["source_series_uid"]) if row["source_series_uid"] else None
    return page(request, "series.html", series=row, explanation=explanation, derived=derived,
                source=source, instances=browse.series_instances(ctx.index, uid),
                jobs=browse.series_jobs(ctx.index, uid),
                sends={d["series_uid"]: browse.series_sends(ctx.index, d["series_uid"])
                       for d in [row, *derived]}, actions=_actions(ctx, row),
                done=request.query_params.get("done"))


def _actions(ctx: WebContext, row: Any) -> list[str]:
    """What the series page offers: resend where it has a harmonised copy, re-harmonise
    for an original (refused with the reason when it is busy)."""
    offered = []
    if row["kind"] == "derived" or ctx.index.derived_series(row["series_uid"]):
        offered.append("resend")
    if row["kind"] == "original":
        offered.append("reprocess")
    return offered


def confirm(request: Request) -> Response:
    ctx = context_of(request)
    uid, action = request.path_params["uid"], request.path_params["action"]
    if action not in ACTIONS or ctx.index.series(uid) is None:
        return not_found(request, f"no {action} for series {uid}")
    return page(request, "confirm.html", uid=uid, action=action, title=ACTIONS[action],
                peers=[p.ae_title for p in ctx.config.peers if p.port],
                token=ctx.tokens.make(request, action, uid))


async def act(request: Request) -> Response:
    """Run a confirmed action, audit it (done or refused), show the series again."""
    form = await request.form()
    return await run_in_threadpool(_act, request, str(form.get("token") or ""),
                                   str(form.get("to") or "").strip() or None)


def _act(request: Request, token: str, to: str | None) -> Response:
    ctx = context_of(request)
    uid, action = request.path_params["uid"], request.path_params["action"]
    if action not in ACTIONS:
        return not_found(request, f"no action {action}")
    who, where = user_of(request), client_of(request)
    refused = ctx.tokens.check(request, action, uid, token)
    if refused:
        ctx.audit.record(who, where, action, f"refused: {refused}", series_uid=uid)
        return page(request, "message.html", 403, title="Refused", message=refused)
    try:
        outcome = _run(ctx, action, uid, to)
    except UserError as exc:
        ctx.audit.record(who, where, action, f"refused: {exc}", series_uid=uid,
                         destination=to)
        return page(request, "message.html", 409, title="Not done", message=str(exc))
    ctx.audit.record(who, where, action, outcome, series_uid=uid, destination=to)
    return RedirectResponse(f"/series/{uid}?done={quote(outcome)}", status_code=303)


def _run(ctx: WebContext, action: str, uid: str, to: str | None) -> str:
    """The commands' code paths: ``dicomnode resend --series`` and ``reprocess --series``."""
    if action == "resend":
        if to is not None and (ctx.config.peer(to) is None or ctx.config.peer(to).port is None):
            raise UserError(f"{to} is not a peer with a port")
        return f"{resend_series(ctx.index, uid, to)} instance send(s) queued"
    why = ctx.index.reprocess(uid)
    if why is not None:
        raise UserError(f"series {uid} {why}")
    log.info("reprocess_requested", series_uid=uid)
    return "queued for harmonisation"


def models(request: Request) -> Response:
    ctx = context_of(request)
    cards = []
    for info in list_model_folders(ctx.config.node.models_dir):
        if isinstance(info, Exception):
            cards.append({"error": str(info)})
            continue
        report = info.path / "report"
        images = sorted(str(p.relative_to(report)) for p in report.rglob("*.png")) \
            if report.is_dir() else []
        cards.append({"info": info, "images": images, "folder": info.path.name,
                      "routes": [r.name for r in ctx.config.routes
                                 if r.model == info.path.name]})
    return page(request, "models.html", cards=cards)


def model_image(request: Request) -> Response:
    """A PNG of a model folder's report; nothing outside that folder."""
    ctx = context_of(request)
    root = Path(ctx.config.node.models_dir).resolve()
    report = (root / request.path_params["name"] / "report").resolve()
    path = (report / request.path_params["path"]).resolve()
    if report.parent.parent != root or not path.is_relative_to(report) or \
            path.suffix != ".png" or not path.is_file():
        return Response(status_code=404)
    return FileResponse(path, media_type="image/png")


def audit(request: Request) -> Response:
    return page(request, "audit.html", entries=context_of(request).audit.latest(200))


ROUTES = [
    Route("/", overview),
    Route("/series", series_list),
    Route("/series/{uid}", series_detail),
    Route("/series/{uid}/{action}", confirm, methods=["GET"]),
    Route("/series/{uid}/{action}", act, methods=["POST"]),
    Route("/models", models),
    Route("/models/{name}/report/{path:path}", model_image),
    Route("/audit", audit),
]
