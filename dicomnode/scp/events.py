"""The one place that binds the node's handlers to pynetdicom's events, and builds the
listening AE with the (non-storage) contexts it serves; every storage class is accepted
(:func:`dicomnode.net.server.start_server`)."""

from __future__ import annotations

from typing import Any

from pynetdicom import AE, evt

from dicomnode.config import Config
from dicomnode.net import compat
from dicomnode.net.ae import node_ae
from dicomnode.scp.association import (
    handle_accepted,
    handle_closed,
    handle_conn_close,
    handle_conn_open,
    handle_requested,
)
from dicomnode.scp.commitment import add_commitment_context, handle_n_action
from dicomnode.scp.context import ScpContext
from dicomnode.scp.qr import add_qr_contexts, handle_find, handle_get, handle_move
from dicomnode.scp.storage import handle_store
from dicomnode.scp.verification import add_verification_context, handle_echo


def event_handlers(ctx: ScpContext) -> list[tuple[Any, ...]]:
    """``(event, handler, [ctx, ...])`` for every event the node handles."""
    return [
        (evt.EVT_CONN_OPEN, handle_conn_open, [ctx]),
        (evt.EVT_REQUESTED, handle_requested, [ctx]),
        (evt.EVT_ACCEPTED, handle_accepted, [ctx]),
        (evt.EVT_RELEASED, handle_closed, [ctx, "released"]),
        (evt.EVT_ABORTED, handle_closed, [ctx, "aborted"]),
        (evt.EVT_CONN_CLOSE, handle_conn_close, [ctx]),
        (evt.EVT_C_ECHO, handle_echo, [ctx]),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_C_FIND, handle_find, [ctx]),
        (evt.EVT_C_MOVE, handle_move, [ctx]),
        (evt.EVT_C_GET, handle_get, [ctx]),
        (evt.EVT_N_ACTION, handle_n_action, [ctx]),
        *compat.wake_handlers(),
    ]


def build_ae(config: Config) -> AE:
    """An AE with our title, limits, timeouts and the non-storage contexts we accept."""
    ae = node_ae(config)
    # the node counts associations itself (scp.context.Slots); pynetdicom's own count also
    # holds connections still handshaking, which the guard bounds by max_handshakes
    ae.maximum_associations = config.node.max_associations + config.node.max_handshakes
    ae.maximum_pdu_size = config.node.max_pdu_size
    add_verification_context(ae)
    add_qr_contexts(ae)
    add_commitment_context(ae)
    return ae
