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


def peer_allowed(config: Config, calling_ae: str, host: str) -> str | None:
    """None if the peer may associate, else the reason it may not."""
    caller = _address(host)
    loopback = is_loopback(host)
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
