"""The DICOM service class provider: association policy and one handler per DIMSE event.

Handlers are small functions of ``(event, ctx)``; all state lives in :class:`ScpContext`
(config, index, paths) so each handler can be exercised on its own.
"""

from __future__ import annotations

import ipaddress
import socket
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom import sop_class as sc
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.client import node_ae, nodelay
from dicomnode.commitment import add_commitment_context, commitment_handlers
from dicomnode.config import Config
from dicomnode.index import Index
from dicomnode.log import get_logger
from dicomnode.qr import SOP_CLASS_NOT_SUPPORTED, add_qr_contexts, qr_handlers
from dicomnode.receive import RejectedInstance, receive_file
from dicomnode.storage import StorageFull, ensure_dir
from dicomnode.tls import TlsAssociationServer, TlsSettings, server_context

log = get_logger("scp")

# C-STORE status codes (PS3.4 B.2.3); rejections carry their own (receive.py)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


# Where a peer proposes several transfer syntaxes for one context, the node takes the one
# that comes first in this list (explicit VR first: implicit VR loses the VR of private
# elements), else the peer's first: each is stored as it arrives; these are the decoded ones.
PREFERRED_SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
)
_RANK = {str(uid): rank for rank, uid in enumerate(PREFERRED_SYNTAXES)}


@dataclass
class ScpContext:
    """Everything the handlers need, and nothing they own."""

    config: Config
    index: Index

    @property
    def data_dir(self) -> Path:
        return self.config.node.data_dir


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(host: str) -> IPAddress | None:
    """``host`` as an address (an IPv4-mapped IPv6 address as its IPv4 one), or None."""
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    return getattr(addr, "ipv4_mapped", None) or addr


def resolve(host: str) -> set[IPAddress]:
    """The addresses of a configured peer host: itself, or what its name resolves to now
    (so a peer renumbered in DNS is followed without a restart). Raises OSError."""
    addr = _address(host)
    if addr is not None:
        return {addr}
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return {a for *_, sockaddr in infos if (a := _address(str(sockaddr[0]))) is not None}


def peer_allowed(config: Config, calling_ae: str, host: str) -> str | None:
    """None if the peer may associate, else the reason it may not."""
    caller = _address(host)
    loopback = caller is not None and caller.is_loopback
    peer = config.peer(calling_ae)
    reason = f"calling AE '{calling_ae}' is not a configured peer"
    if peer is not None:
        try:
            allowed = resolve(peer.host)
        except OSError as exc:
            allowed = set()
            reason = (f"calling AE '{calling_ae}' is configured for host {peer.host}, which"
                      f" cannot be resolved ({exc.strerror or exc})")
        else:
            reason = f"calling AE '{calling_ae}' is configured for host {peer.host}, not {host}"
        if caller in allowed or (loopback and any(a.is_loopback for a in allowed)):
            return None
    if config.node.accept_any_loopback and loopback:
        return None
    return reason


# pynetdicom's DUL reactor sleeps this long whenever it finds no event (1 ms by default, its
# documented latency/idle-CPU trade-off): a peer waiting for each C-STORE response waits for
# it too, so a shorter nap lets a single association carry ~12% more images per second.
DUL_IDLE_SLEEP = 0.0001


def handle_conn_open(event: evt.Event, ctx: ScpContext) -> None:
    """Disable Nagle (a C-STORE response is tiny and must not wait for a delayed ACK) and
    shorten the reactor's idle nap."""
    dul = event.assoc.dul
    if hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_IDLE_SLEEP
    nodelay(event)


def handle_requested(event: evt.Event, ctx: ScpContext) -> None:
    """Reject associations meant for another AE title or from unknown peers: A-ASSOCIATE-RJ,
    rejected-permanent, service user, reason called / calling AE title not recognised."""
    assoc = event.assoc
    calling = assoc.requestor.primitive.calling_ae_title.strip()
    called = assoc.requestor.primitive.called_ae_title.strip()
    host = assoc.requestor.address
    node = ctx.config.node
    if node.require_called_aet and called != node.ae_title:
        reason, code = f"called AE title '{called}' is not ours ('{node.ae_title}')", 0x07
    else:
        reason, code = peer_allowed(ctx.config, calling, host), 0x03
    if reason is None:
        prefer_syntaxes(assoc.requestor.primitive.presentation_context_definition_list)
        return
    log.warning("association_rejected", calling_ae=calling, called_ae=called, host=host,
                reason=reason)
    assoc.acse.send_reject(0x01, 0x01, code)
    assoc.is_rejected = True
    assoc.kill()


def prefer_syntaxes(proposed: list[PresentationContext]) -> None:
    """Order each proposed context's transfer syntaxes by :data:`PREFERRED_SYNTAXES`
    (stable: others keep the peer's order, after them), as the unrestricted storage
    negotiation (:func:`start_server`) accepts the first."""
    for context in proposed:
        context.transfer_syntax = sorted(context.transfer_syntax,
                                         key=lambda uid: _RANK.get(str(uid), len(_RANK)))


def handle_accepted(event: evt.Event, ctx: ScpContext) -> None:
    r = event.assoc.requestor
    log.info("association_accepted", calling_ae=r.ae_title.strip(), host=r.address,
             port=r.port, max_pdu=r.maximum_length)


def handle_closed(event: evt.Event, ctx: ScpContext, how: str) -> None:
    r = event.assoc.requestor
    log.info(f"association_{how}", calling_ae=r.ae_title.strip(), host=r.address)


def handle_echo(event: evt.Event, ctx: ScpContext) -> int:
    return SUCCESS


def receive_into(folder: Path) -> None:
    """Have pynetdicom write each C-STORE data set to a file in ``folder`` as its fragments
    arrive, instead of collecting it in memory (a 600 MB instance took 1.2 GB), so that
    :func:`handle_store` moves the file into the spool. pynetdicom names no folder for
    these files, so this sets the process's temporary folder: call it once, at start-up."""
    ensure_dir(folder)
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(folder)


def handle_store(event: evt.Event, ctx: ScpContext) -> int:
    """Store one instance byte for byte; Success only once it is on disk and indexed.
    pynetdicom has written it to a file already (:func:`receive_into`)."""
    request = event.request
    ts = str(event.context.transfer_syntax)
    node = ctx.config.node
    negotiated = str(event.context.abstract_syntax)
    if str(request.AffectedSOPClassUID) != negotiated:
        log.warning("instance_rejected", sop_instance_uid=str(request.AffectedSOPInstanceUID),
                    calling_ae=event.assoc.requestor.ae_title.strip(),
                    reason=f"C-STORE of SOP class {request.AffectedSOPClassUID} on a"
                    f" presentation context for {negotiated}",
                    status=f"0x{SOP_CLASS_NOT_SUPPORTED:04X}")
        return SOP_CLASS_NOT_SUPPORTED
    try:
        outcome = receive_file(event.dataset_path, index=ctx.index, data_dir=ctx.data_dir,
                               root=ctx.config.spool_dir,
                               reserve_bytes=node.disk_reserve_mb * 2**20,
                               duplicate_policy=node.duplicate_policy, transfer_syntax=ts,
                               affected_sop_class=str(request.AffectedSOPClassUID),
                               affected_sop_instance=str(request.AffectedSOPInstanceUID))
    except RejectedInstance as exc:
        log.warning("instance_rejected", sop_instance_uid=str(request.AffectedSOPInstanceUID),
                    calling_ae=event.assoc.requestor.ae_title.strip(), reason=str(exc),
                    error_type=exc.error, tag=exc.tag, status=f"0x{exc.status:04X}")
        return exc.status
    except StorageFull as exc:
        log.error("instance_refused_disk_full",
                  sop_instance_uid=str(request.AffectedSOPInstanceUID), reason=str(exc))
        return OUT_OF_RESOURCES
    except (OSError, sqlite3.Error) as exc:  # transient: the peer may retry later
        log.error("instance_store_failed", sop_instance_uid=str(request.AffectedSOPInstanceUID),
                  error_type=type(exc).__name__, reason=str(exc))
        return OUT_OF_RESOURCES
    rec = outcome.record
    log.info("instance_stored", sop_instance_uid=rec.sop_instance_uid,
             series_uid=rec.series_uid, study_uid=rec.study_uid, bytes=outcome.size,
             transfer_syntax=ts, action=outcome.action, reopened_series=outcome.reopened)
    return SUCCESS


def event_handlers(ctx: ScpContext) -> list[tuple[Any, ...]]:
    return [
        (evt.EVT_CONN_OPEN, handle_conn_open, [ctx]),
        (evt.EVT_REQUESTED, handle_requested, [ctx]),
        (evt.EVT_ACCEPTED, handle_accepted, [ctx]),
        (evt.EVT_RELEASED, handle_closed, [ctx, "released"]),
        (evt.EVT_ABORTED, handle_closed, [ctx, "aborted"]),
        (evt.EVT_C_ECHO, handle_echo, [ctx]),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        *qr_handlers(ctx),
        *commitment_handlers(ctx),
    ]


def start_server(ae: AE, address: tuple[str, int], handlers: list[tuple[Any, ...]],
                 tls: TlsSettings) -> ThreadedAssociationServer:
    """Serve ``ae`` in the background on ``address`` (over TLS when ``tls`` has a
    certificate: :class:`~dicomnode.tls.TlsAssociationServer`), taking every storage class.

    A scanner or PACS sends whole studies, and one refused instance fails the peer's whole
    transfer (Orthanc's store job, a scanner's send queue). So pynetdicom's unrestricted
    storage service is on: every standard, private or unknown storage class proposed is
    accepted, in the first transfer syntax proposed (:func:`prefer_syntaxes` orders them),
    and stored as it arrives.
    It also hands every C-STORE to :func:`handle_store`, which refuses one whose SOP class
    is not its context's: otherwise pynetdicom aborts the association on an unknown one.
    Only images of ``pipelines.series.IMAGE_SOP_CLASSES`` are ever harmonised.
    """
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    if not tls.listening:
        server = ae.start_server(address, block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the running server
        return server
    server = ae.make_server(address, evt_handlers=handlers, ssl_context=server_context(tls),
                            server_class=TlsAssociationServer,
                            handshake_timeout=ae.acse_timeout)
    threading.Thread(target=server.serve_forever, name="TlsAcceptor", daemon=True).start()
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it
    return server


def build_ae(config: Config) -> AE:
    """An AE with our title, limits, timeouts and the non-storage contexts we accept."""
    ae = node_ae(config)
    ae.maximum_associations = config.node.max_associations
    ae.maximum_pdu_size = config.node.max_pdu_size
    ae.add_supported_context(sc.Verification)
    add_qr_contexts(ae)  # storage contexts: every one (start_server)
    add_commitment_context(ae)
    return ae
