"""The listening side: pynetdicom's threaded association server, every connection guarded
(:mod:`dicomnode.net.guard`), plain or over TLS."""

from __future__ import annotations

import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import NodeSettings
from dicomnode.net import compat
from dicomnode.net.guard import GuardedServer, Limits
from dicomnode.tls import TlsSettings, server_context


def limits(node: NodeSettings) -> Limits:
    """The guard's limits from ``[node]``."""
    return Limits(handshake=node.acse_timeout, pdu=node.network_timeout,
                  max_pdu=node.max_pdu_size, per_host=node.max_handshakes_per_host,
                  total=node.max_handshakes)


def start_server(ae: AE, address: tuple[str, int], handlers: list[tuple[Any, ...]],
                 tls: TlsSettings, node: NodeSettings) -> ThreadedAssociationServer:
    """Serve ``ae`` in the background on ``address`` (over TLS when ``tls`` has a
    certificate), taking every storage class.

    A scanner or PACS sends whole studies, and one refused instance fails the peer's whole
    transfer (Orthanc's store job, a scanner's send queue). So pynetdicom's unrestricted
    storage service is on: every standard, private or unknown storage class proposed is
    accepted, in the first transfer syntax proposed (``net.syntax.prefer_syntaxes`` orders
    them), and stored as it arrives. The C-STORE handler refuses one whose SOP class is not
    its context's: otherwise pynetdicom aborts the association on an unknown one.
    Only images of ``pipelines.series.IMAGE_SOP_CLASSES`` are ever harmonised.
    """
    compat.accept_any_storage()
    server = ae.make_server(address, evt_handlers=handlers,
                            ssl_context=server_context(tls) if tls.listening else None,
                            server_class=GuardedServer, limits=limits(node))
    # not "AcceptorThread": pynetdicom takes threads of that name for its associations
    threading.Thread(target=server.serve_forever, name="DicomListener", daemon=True).start()
    compat.register_server(ae, server)
    return server
