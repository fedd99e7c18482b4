"""Storage Commitment Push Model SCP, the request side (PS3.4 Annex J; IHE RAD-10).

A scanner or PACS asks (N-ACTION "Request Storage Commitment") whether the node has taken
responsibility for instances it sent. The request is committed to the index before the
N-ACTION is answered Success, so a restart never loses one; the report goes out later on
an association the node opens (:mod:`dicomnode.dispatch.commitment`), to the requester's
``[[peers]]`` entry. That is how Orthanc and most modalities expect it, and why a
requester without an entry with a port is refused at once rather than never answered.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from dicomnode.config import Config
from dicomnode.log import get_logger
from dicomnode.net.commitment import PUSH_MODEL, REQUEST_COMMITMENT, WELL_KNOWN_INSTANCE
from dicomnode.net.status import (
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_ACTION,
    NO_SUCH_SOP_INSTANCE,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    SUCCESS,
)
from dicomnode.scp.context import ScpContext
from dicomnode.store.commitments import Reference, record_request

log = get_logger("commitment")


class RefusedRequest(ValueError):
    """An N-ACTION the node will not take on: ``status`` and a reason for the peer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_request(action_type: int, requested_instance: str,
                  info: Dataset | None) -> tuple[str, list[Reference]]:
    """The Transaction UID and the (class, instance) pairs of a commitment request.
    Raises :class:`RefusedRequest` with the N-ACTION status for what is wrong."""
    if requested_instance != WELL_KNOWN_INSTANCE:
        raise RefusedRequest(NO_SUCH_SOP_INSTANCE,
                             f"requested SOP instance is not {WELL_KNOWN_INSTANCE}")
    if action_type != REQUEST_COMMITMENT:
        raise RefusedRequest(NO_SUCH_ACTION, f"action type {action_type} is not 1 (request)")
    transaction = str(getattr(info, "TransactionUID", "") or "")
    if not transaction:
        raise RefusedRequest(INVALID_ARGUMENT_VALUE, "no Transaction UID")
    refs = []
    for item in getattr(info, "ReferencedSOPSequence", None) or []:
        cls = str(item.get("ReferencedSOPClassUID", "") or "")
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not cls or not uid:
            raise RefusedRequest(INVALID_ARGUMENT_VALUE,
                                 "a Referenced SOP item lacks its class or instance UID")
        refs.append((cls, uid))
    if not refs:
        raise RefusedRequest(INVALID_ARGUMENT_VALUE, "empty Referenced SOP Sequence")
    return transaction, refs


def reachable_requester(config: Config, calling_ae: str) -> None:
    """Refuse a request whose report the node could not deliver."""
    peer = config.peer(calling_ae)
    if peer is None or peer.port is None:
        raise RefusedRequest(PROCESSING_FAILURE,
                             f"no [[peers]] port for {calling_ae} to report to")


def handle_n_action(event: evt.Event, ctx: ScpContext) -> tuple[Dataset, None]:
    """N-ACTION on the Push Model: Success once the request is in the index."""
    calling = event.assoc.requestor.ae_title.strip()
    request = event.request
    status = Dataset()
    try:
        transaction, refs = parse_request(int(request.ActionTypeID),
                                          str(request.RequestedSOPInstanceUID),
                                          event.action_information)
        reachable_requester(ctx.config, calling)
        record_request(ctx.index, calling, transaction, refs)
    except RefusedRequest as exc:
        status.Status, status.ErrorComment = exc.status, str(exc)[:64]
        log.warning("commitment_refused", calling_ae=calling, reason=str(exc),
                    status=f"0x{exc.status:04X}")
        return status, None
    except (OSError, sqlite3.Error) as exc:
        status.Status = RESOURCE_LIMITATION
        log.error("commitment_not_recorded", calling_ae=calling,
                  error_type=type(exc).__name__, reason=str(exc))
        return status, None
    except Exception as exc:  # an undecodable Action Information: its type, not its bytes
        status.Status = PROCESSING_FAILURE
        log.warning("commitment_refused", calling_ae=calling, reason=type(exc).__name__,
                    status=f"0x{PROCESSING_FAILURE:04X}")
        return status, None
    log.info("commitment_requested", calling_ae=calling, transaction_uid=transaction,
             instances=len(refs))
    status.Status = SUCCESS
    return status, None


def add_commitment_context(ae: Any) -> None:
    ae.add_supported_context(PUSH_MODEL)
