"""DICOM over TLS (PS3.15 Annex B, BCP 195 profiles), for networks that require it (IHE ATNA).

With ``[tls] certificate`` and ``private_key`` set, the node listens with TLS only; with
``ca`` set too, every peer must present a certificate that chains to it (mutual
authentication). Outgoing associations use TLS to peers marked ``tls = true``, verifying
the peer's chain against ``ca`` (the system's CAs when unset) and presenting the node's
certificate. Host names are not checked: DICOM peers are configured by address and their
certificates name devices, not addresses; the chain and the ``[[peers]]`` allow-list
identify them.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass


class TlsError(ValueError):
    """A TLS setting that cannot be used: names the key and the file."""


@dataclass(frozen=True)
class TlsSettings:
    certificate: str = ""   # PEM certificate (chain) of the node
    private_key: str = ""   # PEM private key of that certificate
    ca: str = ""            # PEM CA certificate(s) that peers' certificates must chain to

    @property
    def listening(self) -> bool:
        """Whether the node's own port speaks TLS (a certificate is configured)."""
        return bool(self.certificate)


def _load_identity(context: ssl.SSLContext, tls: TlsSettings) -> None:
    if bool(tls.certificate) != bool(tls.private_key):
        raise TlsError("certificate and private_key must be set together")
    if not tls.certificate:
        return
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"certificate {tls.certificate} / private_key {tls.private_key}:"
                       f" {why(exc)}") from None


def _load_ca(context: ssl.SSLContext, tls: TlsSettings) -> None:
    try:
        context.load_verify_locations(cafile=tls.ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"ca {tls.ca}: {why(exc)}") from None


def why(exc: Exception) -> str:
    """An SSL or OS error's reason, without the library's decoration."""
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)


@functools.cache
def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The listening side: our certificate; peers' certificates required when ``ca`` is set."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, tls)
    if tls.ca:
        _load_ca(context, tls)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@functools.cache
def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """The connecting side: the peer's chain verified (``ca``, else the system's CAs), our
    certificate presented when we have one."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # see the module docstring; the chain is still verified
    if tls.ca:
        _load_ca(context, tls)
    _load_identity(context, tls)
    return context
