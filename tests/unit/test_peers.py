"""Who may associate: configured peers by address or host name, loopback policy."""

from __future__ import annotations

import socket

import pytest

from dicomnode.config import load_config
from dicomnode.net.policy import peer_allowed


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("""
[node]
accept_any_loopback = false
[[peers]]
ae_title = "BYNAME"
host = "localhost"
[[peers]]
ae_title = "BYADDR"
host = "10.1.2.3"
[[peers]]
ae_title = "NOWHERE"
host = "no-such-host.invalid"
""")
    return load_config(path)


@pytest.mark.parametrize("ae, caller, allowed", [
    ("BYNAME", "127.0.0.1", True),          # a host name is resolved, not compared as text
    ("BYNAME", "::1", True),
    ("BYNAME", "::ffff:127.0.0.1", True),   # IPv4-mapped IPv6
    ("BYNAME", "10.1.2.3", False),
    ("BYADDR", "10.1.2.3", True),
    ("BYADDR", "::ffff:10.1.2.3", True),
    ("BYADDR", "10.1.2.4", False),
    ("BYADDR", "127.0.0.1", False),
    ("OTHER", "127.0.0.1", False),
])
def test_peer_hosts_compare_as_addresses(config, ae, caller, allowed):
    assert (peer_allowed(config, ae, caller) is None) is allowed


def test_unresolvable_peer_host_is_a_clear_rejection(config):
    reason = peer_allowed(config, "NOWHERE", "127.0.0.1")
    assert reason.startswith("calling AE 'NOWHERE' is configured for host"
                             " no-such-host.invalid, which cannot be resolved")
    assert peer_allowed(config, "OTHER", "10.0.0.9") == (
        "calling AE 'OTHER' is not a configured peer")


def test_a_peer_name_is_resolved_at_association_time(tmp_path, monkeypatch):
    path = tmp_path / "node.toml"
    path.write_text('[[peers]]\nae_title = "PACS"\nhost = "pacs.example"\n')
    config = load_config(path)
    dns = {"pacs.example": "10.9.8.7"}
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (dns[host], 0))])
    assert peer_allowed(config, "PACS", "10.9.8.7") is None
    assert peer_allowed(config, "PACS", "::ffff:10.9.8.7") is None
    dns["pacs.example"] = "10.9.8.8"  # renumbered: followed without a restart
    assert peer_allowed(config, "PACS", "10.9.8.7") is not None
    assert peer_allowed(config, "PACS", "10.9.8.8") is None
