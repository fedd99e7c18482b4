"""Who may associate with the node: the ``[[peers]]`` allow-list, by AE title and address."""

from __future__ import annotations

import ipaddress
import socket

from dicomnode.config import Config

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


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address."""
    addr = _address(host)
    return addr is not None and addr.is_loopback


def _at(peer_host: str, host: str) -> bool:
    """Whether ``host`` is an address of ``peer_host`` (for a peer on loopback, any
    loopback address). Raises OSError when ``peer_host`` cannot be resolved."""
    allowed = resolve(peer_host)
    return _address(host) in allowed or (is_loopback(host)
                                         and any(a.is_loopback for a in allowed))


def host_allowed(config: Config, host: str) -> str | None:
    """None if ``host`` may use the node's services that carry no AE title (DICOMweb): the
    address of a configured peer, or loopback with ``accept_any_loopback``; else why not."""
    if config.node.accept_any_loopback and is_loopback(host):
        return None
    for peer in config.peers:
        try:
            if _at(peer.host, host):
                return None
        except OSError:
            continue
    return f"host {host} is not the address of a configured peer"


def peer_allowed(config: Config, calling_ae: str, host: str) -> str | None:
    """None if the peer may associate, else the reason it may not."""
    peer = config.peer(calling_ae)
    reason = f"calling AE '{calling_ae}' is not a configured peer"
    if peer is not None:
        try:
            if _at(peer.host, host):
                return None
        except OSError as exc:
            reason = (f"calling AE '{calling_ae}' is configured for host {peer.host}, which"
                      f" cannot be resolved ({exc.strerror or exc})")
        else:
            reason = f"calling AE '{calling_ae}' is configured for host {peer.host}, not {host}"
    if config.node.accept_any_loopback and is_loopback(host):
        return None
    return reason
