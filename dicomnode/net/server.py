"""The listening side: pynetdicom's threaded association server, plain or over TLS."""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.log import get_logger
from dicomnode.net import compat
from dicomnode.tls import TlsSettings, server_context, why

log = get_logger("tls")


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved into each association's
    own thread and bounded by ``handshake_timeout``.

    pynetdicom handshakes in the accept loop without a timeout, so one peer that connects
    and never says hello would stop the node accepting anyone. A failed handshake (no
    certificate, an untrusted one, plain DICOM on the TLS port) is logged and dropped.
    """

    def __init__(self, *args: Any, handshake_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handshake_timeout = handshake_timeout

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        return self.socket.accept()  # type: ignore[union-attr]

    def finish_request(self, request: Any, client_address: Any) -> None:
        assert self.ssl_context is not None
        request.settimeout(self.handshake_timeout)
        try:
            wrapped = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.warning("tls_handshake_failed", host=str(client_address[0]),
                        reason=why(exc))
            request.close()
            return
        wrapped.settimeout(None)
        super().finish_request(wrapped, client_address)


def start_server(ae: AE, address: tuple[str, int], handlers: list[tuple[Any, ...]],
                 tls: TlsSettings) -> ThreadedAssociationServer:
    """Serve ``ae`` in the background on ``address`` (over TLS when ``tls`` has a
    certificate: :class:`TlsAssociationServer`), taking every storage class.

    A scanner or PACS sends whole studies, and one refused instance fails the peer's whole
    transfer (Orthanc's store job, a scanner's send queue). So pynetdicom's unrestricted
    storage service is on: every standard, private or unknown storage class proposed is
    accepted, in the first transfer syntax proposed (``net.syntax.prefer_syntaxes`` orders
    them), and stored as it arrives. The C-STORE handler refuses one whose SOP class is not
    its context's: otherwise pynetdicom aborts the association on an unknown one.
    Only images of ``pipelines.series.IMAGE_SOP_CLASSES`` are ever harmonised.
    """
    compat.accept_any_storage()
    if not tls.listening:
        server = ae.start_server(address, block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the running server
        return server
    server = ae.make_server(address, evt_handlers=handlers, ssl_context=server_context(tls),
                            server_class=TlsAssociationServer,
                            handshake_timeout=ae.acse_timeout)
    threading.Thread(target=server.serve_forever, name="TlsAcceptor", daemon=True).start()
    compat.register_server(ae, server)
    return server
