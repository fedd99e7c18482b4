"""The node's Application Entity: its title, implementation identity and timeouts, for the
listening side and for every association it opens."""

from __future__ import annotations

import socket

from pynetdicom import AE, evt

from dicomnode.config import Config
from dicomnode.net import compat
from pipelines import IMPLEMENTATION_CLASS_UID, implementation_version_name


def nodelay(event: evt.Event) -> None:
    """Disable Nagle on an association's socket: each small DIMSE message would otherwise
    wait for the peer's delayed ACK (40 ms on Linux) before it leaves."""
    sock = compat.tcp_socket(event.assoc)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def node_ae(config: Config) -> AE:
    """An AE with our title, our implementation's identity and the configured timeouts."""
    node = config.node
    ae = AE(ae_title=node.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = implementation_version_name()
    ae.acse_timeout, ae.dimse_timeout = node.acse_timeout, node.dimse_timeout
    ae.network_timeout = node.network_timeout
    return ae


def client_ae(config: Config) -> AE:
    """An AE for one outgoing association."""
    ae = node_ae(config)
    ae.connection_timeout = min(config.node.acse_timeout, 30.0)
    return ae
