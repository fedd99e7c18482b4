"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET over the node's index (originals and
harmonised copies alike), Patient Root and Study Root.

Handlers are generators of ``(event, ctx)`` as pynetdicom expects; matching is in
:mod:`dicomnode.store.query`, the index access in :mod:`dicomnode.store.lookup`. Every
loop checks ``event.is_cancelled`` so a C-CANCEL stops a query or retrieve between two
responses/sub-operations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom import sop_class as sc

from dicomnode.config import Peer
from dicomnode.log import get_logger
from dicomnode.net.ae import nodelay
from dicomnode.net.peer import association_problem, transport
from dicomnode.net.status import CANCEL, PENDING, SOP_CLASS_NOT_SUPPORTED, UNABLE_TO_PROCESS
from dicomnode.net.syntax import describe_failure, fit_to_association, store_contexts
from dicomnode.scp.context import ScpContext
from dicomnode.store.lookup import find, retrieve_rows
from dicomnode.store.query import QueryError, parse_identifier, response

log = get_logger("qr")

FIND_CLASSES = (sc.PatientRootQueryRetrieveInformationModelFind,
                sc.StudyRootQueryRetrieveInformationModelFind)
MOVE_CLASSES = (sc.PatientRootQueryRetrieveInformationModelMove,
                sc.StudyRootQueryRetrieveInformationModelMove)
GET_CLASSES = (sc.PatientRootQueryRetrieveInformationModelGet,
               sc.StudyRootQueryRetrieveInformationModelGet)
PATIENT_ROOT = {str(c) for c in (FIND_CLASSES[0], MOVE_CLASSES[0], GET_CLASSES[0])}
SERVED = {str(c) for c in (*FIND_CLASSES, *MOVE_CLASSES, *GET_CLASSES)}


# --- handlers -------------------------------------------------------------------------

def _model(event: evt.Event) -> str:
    """The request's information model; a QueryError (0x0122) for any other than ours,
    such as a worklist query (pynetdicom's unrestricted storage negotiation accepts the few
    non-storage classes it names differently from pydicom)."""
    sop_class = str(event.request.AffectedSOPClassUID)
    if sop_class not in SERVED:
        raise QueryError(f"SOP class {sop_class} is not served here", SOP_CLASS_NOT_SUPPORTED)
    return "PATIENT" if sop_class in PATIENT_ROOT else "STUDY"


def _calling(event: evt.Event) -> str:
    return event.assoc.requestor.ae_title.strip()


def handle_find(event: evt.Event, ctx: ScpContext) -> Iterator[tuple[int, Any]]:
    started = time.monotonic()
    try:
        query = parse_identifier(event.identifier, _model(event))
        records = find(ctx.index, query)
    except QueryError as exc:
        log.warning("find_refused", calling_ae=_calling(event), reason=str(exc))
        yield failure(exc), None
        return
    except Exception as exc:  # a malformed identifier or a broken row: refuse, keep running
        log.exception("find_failed", calling_ae=_calling(event), reason=str(exc))
        yield UNABLE_TO_PROCESS, None
        return
    log.info("find", calling_ae=_calling(event), level=query.level, model=_model(event),
             keys=sorted(k.keyword for k in query.filters()), matches=len(records),
             ms=round((time.monotonic() - started) * 1000, 1))
    ae_title = ctx.config.node.ae_title
    for rec in records:
        if event.is_cancelled:
            log.info("find_cancelled", calling_ae=_calling(event))
            yield CANCEL, None
            return
        yield PENDING, response(query, rec, ae_title)


def _load(ctx: ScpContext, row: Any, accepted: Any, role: str) -> Any:
    """The dataset of one instance, fitted to the sub-operation association, or a reason.

    Whatever is wrong with the file, the answer is one failed sub-operation, never a
    crashed handler (which would end the whole retrieve).
    """
    try:
        ds = dcmread(ctx.data_dir / row["path"])
        return fit_to_association(ds, accepted, role)
    except Exception as exc:
        reason = describe_failure(exc)
        log.warning("retrieve_instance_unavailable", sop_instance_uid=row["sop_instance_uid"],
                    error_type=type(exc).__name__, reason=reason)
        return f"unavailable: {reason}"  # pynetdicom counts a non-dataset as a failed sub-op


class MoveDestinationUnreachable(ConnectionError):
    """A configured C-MOVE destination could not be associated with."""


def failure(exc: Exception) -> Dataset:
    """The final response status for a refused query or retrieve, with the reason as its
    Error Comment (LO: 64 characters) so the SCU's log says why."""
    status = Dataset()
    status.Status = exc.status if isinstance(exc, QueryError) else UNABLE_TO_PROCESS
    status.ErrorComment = str(exc)[:64]
    return status


class RefusalSink:
    """Where a refused C-MOVE's sub-operations go: nowhere.

    pynetdicom sends a C-MOVE's final status only once it holds an association with a
    destination. A C-MOVE whose identifier must be refused (0xA900: a wildcard or empty
    unique key) is answered so whatever its destination: down, unknown or fine. So its
    sub-operation association is opened to this SCP of the node's own, on loopback, which
    accepts it and is never sent anything.
    """

    CONTEXTS = (sc.Verification,)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._address: tuple[str, int] | None = None

    def destination(self) -> tuple[str, int, dict[str, Any]]:
        with self._lock:
            if self._address is None:
                ae = AE(ae_title="REFUSED")
                ae.add_supported_context(sc.Verification)
                server = ae.start_server(("127.0.0.1", 0), block=False)
                assert server is not None  # block=False returns the running server
                self._address = server.server_address[:2]
        host, port = self._address
        return host, port, {"contexts": [build_context(c) for c in self.CONTEXTS]}


REFUSAL_SINK = RefusalSink()


def _destination(peer: Peer, ctx: ScpContext, contexts: list[Any] | None,
                 *handlers: tuple[Any, ...]) -> tuple[str, int, dict[str, Any]]:
    """What a C-MOVE handler yields first: the destination and how to associate with it
    (pynetdicom opens the sub-operations' association itself; TLS for a ``tls`` peer)."""
    return peer.host, peer.port, {
        "contexts": contexts, "evt_handlers": [*handlers, (evt.EVT_CONN_OPEN, nodelay)],
        "max_pdu": ctx.config.node.max_pdu_size, **transport(ctx.config, peer)}


def handle_move(event: evt.Event, ctx: ScpContext) -> Iterator[Any]:
    """The identifier is judged first (a refused one is refused whatever the destination),
    then the destination (unknown: 0xA801; down: 0xC514), then the instances are sent."""
    dest = str(event.move_destination or "").strip()
    try:
        query = parse_identifier(event.identifier, _model(event))
        rows = retrieve_rows(ctx.index, query)
    except Exception as exc:
        log.warning("move_refused", calling_ae=_calling(event), destination=dest, reason=str(exc))
        yield REFUSAL_SINK.destination()
        yield 1
        yield failure(exc), None
        return
    peer = ctx.config.peer(dest)
    if peer is None or peer.port is None:
        log.warning("move_destination_unknown", calling_ae=_calling(event), destination=dest)
        yield None, None  # -> 0xA801 Move Destination Unknown
        return
    store: dict[str, Any] = {}

    def accepted(ev: evt.Event) -> None:
        store["assoc"] = ev.assoc

    contexts = store_contexts((r["sop_class_uid"], r["transfer_syntax"]) for r in rows)
    problem = association_problem(ctx.config, peer, contexts) if rows else None
    if problem is not None:
        # pynetdicom would answer 0xA801 (Move Destination Unknown) for a known peer that
        # is down; failing before the first yield answers 0xC514 (Unable to process)
        log.error("move_destination_unreachable", calling_ae=_calling(event),
                  destination=dest, host=peer.host, port=peer.port, instances=len(rows),
                  reason=problem)
        raise MoveDestinationUnreachable(problem)
    yield _destination(peer, ctx, contexts or None, (evt.EVT_ACCEPTED, accepted))
    log.info("move", calling_ae=_calling(event), destination=dest, level=query.level,
             instances=len(rows))
    yield len(rows)
    for row in rows:
        if event.is_cancelled:
            log.info("move_cancelled", calling_ae=_calling(event), destination=dest)
            yield CANCEL, None
            return
        assoc = store.get("assoc")
        yield PENDING, _load(ctx, row, assoc.accepted_contexts if assoc else [], "scu")


def handle_get(event: evt.Event, ctx: ScpContext) -> Iterator[Any]:
    try:
        query = parse_identifier(event.identifier, _model(event))
        rows = retrieve_rows(ctx.index, query)
    except Exception as exc:
        log.warning("get_refused", calling_ae=_calling(event), reason=str(exc))
        yield 1
        yield failure(exc), None
        return
    log.info("get", calling_ae=_calling(event), level=query.level, instances=len(rows))
    yield len(rows)
    for row in rows:
        if event.is_cancelled:
            log.info("get_cancelled", calling_ae=_calling(event))
            yield CANCEL, None
            return
        yield PENDING, _load(ctx, row, event.assoc.accepted_contexts, "scu")


def add_qr_contexts(ae: Any) -> None:
    """Patient Root and Study Root FIND / MOVE / GET, default transfer syntaxes."""
    for cls in (*FIND_CLASSES, *MOVE_CLASSES, *GET_CLASSES):
        ae.add_supported_context(cls)
