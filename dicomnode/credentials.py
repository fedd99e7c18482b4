"""Who may use the web console: ``[web] users`` entries, and checking what a client presents.

An entry is ``NAME:pbkdf2_sha256$ITERATIONS$SALT$DIGEST`` (salt and digest in hex): the
config holds a salted, slow hash, never the secret. ``dicomnode web user NAME`` makes one.
The same secret serves HTTP Basic (``NAME`` and the secret) and a Bearer token (the secret
alone, for Prometheus and scripts).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

ALGORITHM = "pbkdf2_sha256"
ITERATIONS = 200_000  # ~0.25 s on one core of a small server; verified once per process


@dataclass(frozen=True)
class Credential:
    """One user: the name the audit log records, and the hash of their secret."""

    name: str
    iterations: int
    salt: bytes
    digest: bytes

    def verify(self, secret: str) -> bool:
        """Whether ``secret`` is this user's (constant time in the digest comparison)."""
        candidate = hashlib.pbkdf2_hmac("sha256", secret.encode(), self.salt, self.iterations)
        return hmac.compare_digest(candidate, self.digest)


def parse(entry: str) -> Credential:
    """A ``users`` entry; ValueError saying what is wrong with it (never quoting the hash)."""
    name, sep, hashed = entry.partition(":")
    if not sep or not name.strip() or not name.isprintable() or len(name) > 64:
        raise ValueError("must be NAME:HASH with a printable name of 1-64 characters")
    parts = hashed.split("$")
    if len(parts) != 4 or parts[0] != ALGORITHM:
        raise ValueError(f"user '{name}': the hash must be {ALGORITHM}$ITERATIONS$SALT$DIGEST"
                         " (make one with: dicomnode web user NAME)")
    try:
        iterations, salt, digest = int(parts[1]), bytes.fromhex(parts[2]), bytes.fromhex(parts[3])
    except ValueError:
        raise ValueError(f"user '{name}': iterations, salt or digest is not readable") from None
    if iterations < 10_000 or len(salt) < 16 or len(digest) != 32:
        raise ValueError(f"user '{name}': needs >= 10000 iterations, a 16-byte salt and a"
                         " 32-byte digest")
    return Credential(name, iterations, salt, digest)


def entry(name: str, secret: str, iterations: int = ITERATIONS) -> str:
    """The ``users`` entry for ``name`` with ``secret`` (a fresh random salt)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)
    return f"{name}:{ALGORITHM}${iterations}${salt.hex()}${digest.hex()}"


def new_secret() -> str:
    """A random secret (192 bits), URL-safe, for a user or a scraper's token."""
    return secrets.token_urlsafe(24)
