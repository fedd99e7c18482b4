"""Association events on the listening side: who may associate, and what is logged."""

from __future__ import annotations

from pynetdicom import evt

from dicomnode import metrics
from dicomnode.log import get_logger
from dicomnode.net import compat
from dicomnode.net.ae import nodelay
from dicomnode.net.policy import peer_allowed
from dicomnode.net.status import (
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_RECOGNISED,
    LOCAL_LIMIT_EXCEEDED,
    REJECTED_PERMANENT,
    REJECTED_TRANSIENT,
    SERVICE_PROVIDER_PRESENTATION,
    SERVICE_USER,
)
from dicomnode.net.syntax import prefer_syntaxes
from dicomnode.scp.context import ScpContext

log = get_logger("scp")


def handle_conn_open(event: evt.Event, ctx: ScpContext) -> None:
    """Disable Nagle: a C-STORE response is tiny and must not wait for a delayed ACK."""
    nodelay(event)


def handle_requested(event: evt.Event, ctx: ScpContext) -> None:
    """Reject associations meant for another AE title or from unknown peers (A-ASSOCIATE-RJ,
    rejected-permanent, service user, reason called / calling AE title not recognised),
    and, with every slot held, the rest (rejected-transient, local limit exceeded)."""
    assoc = event.assoc
    request = compat.association_request(assoc)
    calling = request.calling_ae_title.strip()
    called = request.called_ae_title.strip()
    host = assoc.requestor.address
    node = ctx.config.node
    if node.require_called_aet and called != node.ae_title:
        reason = f"called AE title '{called}' is not ours ('{node.ae_title}')"
        code = CALLED_AE_NOT_RECOGNISED
    else:
        reason, code = peer_allowed(ctx.config, calling, host), CALLING_AE_NOT_RECOGNISED
    if reason is None:
        if ctx.slots.take(assoc):
            prefer_syntaxes(request.presentation_context_definition_list)
            return
        reason = f"local limit exceeded ({ctx.slots.limit} associations)"
        result, source, code = REJECTED_TRANSIENT, SERVICE_PROVIDER_PRESENTATION, \
            LOCAL_LIMIT_EXCEEDED
    else:
        result, source = REJECTED_PERMANENT, SERVICE_USER
    metrics.association(calling, ctx.config.peer(calling) is not None, "rejected")
    log.warning("association_rejected", calling_ae=calling, called_ae=called, host=host,
                reason=reason)
    compat.reject(assoc, result, source, code)


def handle_accepted(event: evt.Event, ctx: ScpContext) -> None:
    r = event.assoc.requestor
    metrics.association(r.ae_title, ctx.config.peer(r.ae_title) is not None, "accepted")
    log.info("association_accepted", calling_ae=r.ae_title.strip(), host=r.address,
             port=r.port, max_pdu=r.maximum_length)


def handle_closed(event: evt.Event, ctx: ScpContext, how: str) -> None:
    r = event.assoc.requestor
    log.info(f"association_{how}", calling_ae=r.ae_title.strip(), host=r.address)
    metrics.association(r.ae_title, ctx.config.peer(r.ae_title) is not None, how)
    handle_conn_close(event, ctx)


def handle_conn_close(event: evt.Event, ctx: ScpContext) -> None:
    """However an association ends: its slot is free, its partial data sets gone."""
    ctx.slots.give_back(event.assoc)
    ctx.incoming.discard(event.assoc)
