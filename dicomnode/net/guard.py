"""The listening side's transport guard: every byte a peer sends passes through here before
pynetdicom sees it, so no peer can hold the node's resources longer or larger than its
configuration allows.

pynetdicom reads each PDU whole (its 6-byte header, then as many bytes as the header
claims) with blocking reads and no deadline, and counts an association against
``maximum_associations`` from the moment a connection opens. So one peer could keep a slot
(and a thread) forever by sending an A-ASSOCIATE-RQ one byte at a time, and make the node
buffer any length it claims. The guard sits between the socket and pynetdicom's
``AssociationSocket`` (the socket handed to pynetdicom's request handler, or the
``SSLContext.sslsocket_class`` for TLS) and:

* reads each PDU header itself and judges it before pynetdicom reads the body: a type
  that is not a PDU, an A-ASSOCIATE-RQ longer than :data:`REQUEST_LIMIT`, a P-DATA-TF
  longer than ``max_pdu_size``, or anything but an A-ASSOCIATE-RQ first, is answered with
  A-ABORT without reading the body; a PDU it takes (up to 4 MiB) it reads whole, in a few
  large reads, and hands to pynetdicom from memory (which reads it 4 KiB at a time);
* reads the A-ASSOCIATE-RQ whole and rejects (A-ASSOCIATE-RJ) one without an Application
  Context or with a blank calling or called AE title, which pynetdicom would otherwise
  abort or accept;
* holds the whole handshake to ``acse_timeout`` from the connection's first moment, and
  each later PDU, once its first byte has arrived, to ``network_timeout``, enforced on
  every read while the bytes trickle in;
* after the node sends an A-ABORT or A-ASSOCIATE-RJ, closes its side at once and reads
  (and drops) what the peer still sends until it closes, for at most :data:`CLOSE_GRACE`,
  so the peer reads the PDU rather than a reset, and the connection ends within the grace
  instead of the ARTIM timeout.

:class:`GuardedServer` limits unfinished handshakes per remote host and in all, refusing a
connection beyond them before any thread is spent on it; the association limit itself is
counted from completed requests only (:mod:`dicomnode.scp.association`).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.log import get_logger
from dicomnode.tls import why

log = get_logger("guard")

A_ASSOCIATE_RQ, A_ASSOCIATE_RJ, P_DATA_TF, A_ABORT = 0x01, 0x03, 0x04, 0x07
PDU_TYPES = frozenset(range(0x01, 0x08))
REQUEST_LIMIT = 65536   # an A-ASSOCIATE-RQ with every context a PACS proposes is ~20 KiB
CONTROL_LIMIT = 65536   # other PDUs are a few bytes
UNLIMITED = 2**32 - 1   # max_pdu_size 0
PREREAD = 4 * 2**20     # a PDU up to this long is read whole before pynetdicom reads it
CLOSE_GRACE = 1.0       # seconds a peer has to close after our A-ABORT / A-ASSOCIATE-RJ
APPLICATION_CONTEXT_ITEM = 0x10
# A-ABORT source / reason (PS3.8 9.3.8), A-ASSOCIATE-RJ result / source / reason (9.3.4)
PROVIDER, NOT_SPECIFIED, UNRECOGNISED_PDU, UNEXPECTED_PDU = 0x02, 0x00, 0x01, 0x02
INVALID_PARAMETER = 0x06
REJECTED_PERMANENT, SERVICE_USER = 0x01, 0x01
NO_REASON, CONTEXT_NOT_SUPPORTED, CALLING_AE, CALLED_AE = 0x01, 0x02, 0x03, 0x07


@dataclass(frozen=True)
class Limits:
    handshake: float       # seconds from connection to a complete A-ASSOCIATE-RQ
    pdu: float             # seconds for any later PDU, once it has begun
    max_pdu: int           # P-DATA-TF length limit; 0: none
    per_host: int          # unfinished handshakes one remote host may have
    total: int             # unfinished handshakes in all


def abort_pdu(source: int = PROVIDER, reason: int = NOT_SPECIFIED) -> bytes:
    return struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, source, reason)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBLBBBB", A_ASSOCIATE_RJ, 0, 4, 0, result, source, reason)


def request_problem(body: bytes) -> tuple[int, str] | None:
    """Why an A-ASSOCIATE-RQ's body (after its 6-byte header) must be rejected: the
    A-ASSOCIATE-RJ reason and a phrase for the log; None to let pynetdicom negotiate it
    (which aborts what it cannot decode)."""
    if len(body) < 68:
        return None
    called, calling = body[4:20], body[20:36]
    if not calling.strip(b" \x00"):
        return CALLING_AE, "blank calling AE title"
    if not called.strip(b" \x00"):
        return CALLED_AE, "blank called AE title"
    pos = 68
    while pos + 4 <= len(body):
        kind, length = body[pos], int.from_bytes(body[pos + 2:pos + 4], "big")
        if kind == APPLICATION_CONTEXT_ITEM:
            return None
        pos += 4 + length
    return CONTEXT_NOT_SUPPORTED, "no Application Context item"


class _Cut(Exception):
    """The connection is being ended by the guard; recv returns end-of-stream."""


class PduGuard:
    """The PDU-level checks on one connection, over the raw ``recv`` / ``send`` of its
    socket (a plain or a TLS socket; ``settimeout`` and ``shutdown`` likewise)."""

    def __init__(self, raw: Any, host: str, limits: Limits,
                 on_handshake: Callable[[], None]) -> None:
        self.raw, self.host, self.limits = raw, host, limits
        self._on_handshake: Callable[[], None] | None = on_handshake
        self.handshake_deadline = time.monotonic() + limits.handshake
        self.deadline: float | None = None   # of the PDU being read
        self.body_left = 0                   # bytes of the current PDU's body not yet read
        self.pending = memoryview(b"")       # read and judged; pynetdicom has had ``taken``
        self.taken = 0
        self.out_left = 0                    # bytes of the PDU being sent not yet sent
        self.closing = False                 # sending A-ABORT / A-ASSOCIATE-RJ
        self.closing_deadline: float | None = None  # sent: the peer's time to close
        self.ended = False
        self.timeout = float("inf")          # the raw socket's, as last set

    # --- reading --------------------------------------------------------------------

    def recv(self, size: int) -> bytes:
        if self.ended:
            return b""
        if self.closing_deadline is not None:
            self._drain()
            return b""
        try:
            if self.taken == len(self.pending) and not self.body_left:
                self._next_pdu()
            if self.taken < len(self.pending):
                out = self.pending[self.taken:self.taken + size]
                self.taken += len(out)
                return bytes(out)
            chunk = self._read(min(size, self.body_left))
            self.body_left -= len(chunk)
            return chunk
        except _Cut:
            return b""

    def _next_pdu(self) -> None:
        """Read a PDU header and judge it; the A-ASSOCIATE-RQ is read and judged whole."""
        first = self._on_handshake is not None
        self.deadline = self.handshake_deadline if first else None
        header = self._read_exact(6, "the A-ASSOCIATE-RQ" if first else "a PDU header")
        if not header:
            raise _Cut
        if len(header) < 6:
            self._hand_over(header)  # the peer closed mid-header: pynetdicom sees it
            return
        kind, length = header[0], int.from_bytes(header[2:6], "big")
        problem = self._judge(kind, length, first)
        if problem is not None:
            self._refuse(abort_pdu(PROVIDER, problem[0]), "pdu_refused", pdu_type=kind,
                         length=length, reason=problem[1])
        if kind == A_ASSOCIATE_RQ:
            body = self._read_exact(length, "the A-ASSOCIATE-RQ")
            rejected = request_problem(body) if len(body) == length else None
            if rejected is not None:
                self._refuse(reject_pdu(REJECTED_PERMANENT, SERVICE_USER, rejected[0]),
                             "association_request_rejected", reason=rejected[1])
            self._hand_over(header + body)
            self._handshake_done()
        elif length <= PREREAD:  # read whole, in few large reads, handed over from memory
            self._hand_over(header + self._read_exact(length, "a PDU"))
        else:
            self._hand_over(header)
            self.body_left = length

    def _hand_over(self, data: bytes) -> None:
        """What pynetdicom's next reads get, before anything more is read."""
        self.pending, self.taken = memoryview(data), 0

    def _judge(self, kind: int, length: int, first: bool) -> tuple[int, str] | None:
        if kind not in PDU_TYPES:
            return UNRECOGNISED_PDU, f"unknown PDU type 0x{kind:02X}"
        if first != (kind == A_ASSOCIATE_RQ):
            return UNEXPECTED_PDU, (f"PDU type 0x{kind:02X} before an A-ASSOCIATE-RQ" if first
                                    else "a second A-ASSOCIATE-RQ")
        if kind == A_ASSOCIATE_RQ:
            limit = REQUEST_LIMIT
        elif kind == P_DATA_TF:
            limit = self.limits.max_pdu or UNLIMITED
        else:
            limit = CONTROL_LIMIT
        if length > limit:
            return INVALID_PARAMETER, f"a PDU of {length} bytes, over the limit of {limit}"
        return None

    def _read_exact(self, count: int, what: str) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = self._read(count - len(data), what)
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def _read(self, count: int, what: str = "a PDU") -> bytes:
        """One raw read of at most ``count`` bytes before the deadline (which starts with
        the PDU's first byte when none is set); b"" when the peer closed."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.limits.pdu
        left = self.deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            if left < self.timeout / 2:  # the socket's timeout follows the deadline down
                self._set_timeout(left)
            return self.raw.recv(count)
        except TimeoutError:
            self._refuse(abort_pdu(), "peer_too_slow", waiting_for=what,
                         limit_s=self.limits.handshake if self._on_handshake
                         else self.limits.pdu)
        except OSError:
            self.end()
            raise _Cut from None

    def _set_timeout(self, seconds: float) -> None:
        self.raw.settimeout(seconds)
        self.timeout = seconds

    def _refuse(self, pdu: bytes, event: str, **fields: Any) -> NoReturn:
        """Answer with ``pdu`` and end the connection now (what the peer still sends is
        not read: the guard refused to)."""
        log.warning(event, host=self.host, **fields)
        try:
            self._set_timeout(self.limits.pdu)
            self.raw.sendall(pdu)
            self.raw.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.end()
        raise _Cut

    def _drain(self) -> None:
        """Read and drop what the peer sends until it closes or the grace is over."""
        assert self.closing_deadline is not None
        try:
            while (left := self.closing_deadline - time.monotonic()) > 0:
                self._set_timeout(left)
                if not self.raw.recv(65536):
                    break
        except OSError:
            pass
        self.end()

    def _handshake_done(self) -> None:
        done, self._on_handshake = self._on_handshake, None
        if done is not None:
            done()

    # --- writing --------------------------------------------------------------------

    def send(self, data: bytes) -> int:
        """Send as the socket does, noting where PDUs start: once an A-ABORT or
        A-ASSOCIATE-RJ of ours is out, the connection is closed (see :meth:`end`)."""
        if not self.out_left and len(data) >= 6:
            self.out_left = 6 + int.from_bytes(data[2:6], "big")
            self.closing = data[0] in (A_ABORT, A_ASSOCIATE_RJ)
        if self.timeout != self.limits.pdu:
            self._set_timeout(self.limits.pdu)
        sent = self.raw.send(data)
        self.out_left = max(0, self.out_left - sent)
        if self.closing and not self.out_left and self.closing_deadline is None:
            self.closing_deadline = time.monotonic() + CLOSE_GRACE
            try:
                self.raw.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        return sent

    def end(self) -> None:
        """Stop reading for good, and give back the handshake slot (once)."""
        if not self.ended:
            self.ended = True
            self._handshake_done()


class GuardedSocket:
    """A plain TCP socket whose ``recv`` and ``send`` go through a :class:`PduGuard`;
    everything else (``fileno`` for select, ``shutdown``, ``close``) is the socket's."""

    def __init__(self, sock: socket.socket, guard_for: Callable[[Any], PduGuard]) -> None:
        self._sock = sock
        self._guard = guard_for(sock)

    def recv(self, size: int, flags: int = 0) -> bytes:
        return self._guard.recv(size)

    def send(self, data: bytes, flags: int = 0) -> int:
        return self._guard.send(data)

    def close(self) -> None:
        self._guard.end()
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _RawTls:
    """The undecorated socket calls of a :class:`GuardedSSLSocket`."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock

    def recv(self, size: int) -> bytes:
        return ssl.SSLSocket.recv(self.sock, size)

    def send(self, data: bytes) -> int:
        return ssl.SSLSocket.send(self.sock, data)

    def sendall(self, data: bytes) -> None:
        ssl.SSLSocket.sendall(self.sock, data)

    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def shutdown(self, how: int) -> None:
        ssl.SSLSocket.shutdown(self.sock, how)


class GuardedSSLSocket(ssl.SSLSocket):
    """The TLS listening side's socket class (``SSLContext.sslsocket_class``): pynetdicom
    keeps treating it as an SSL socket (``pending()`` data), its reads and writes go
    through the guard set by :meth:`guard`."""

    _guard: PduGuard | None = None

    def guard(self, guard_for: Callable[[Any], PduGuard]) -> None:
        self._guard = guard_for(_RawTls(self))

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self._guard is None:
            return super().recv(buflen, flags)
        return self._guard.recv(buflen)

    def send(self, data: Any, flags: int = 0) -> int:
        if self._guard is None:
            return super().send(data, flags)
        return self._guard.send(bytes(data))

    def close(self) -> None:
        if self._guard is not None:
            self._guard.end()
        super().close()


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with every connection guarded, unfinished
    handshakes limited per remote host and in all, and (with a TLS context) the TLS
    handshake done in the connection's own thread, bounded by the handshake deadline."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._lock = threading.Lock()
        self._unfinished: Counter[str] = Counter()
        if self.ssl_context is not None:
            self.ssl_context.sslsocket_class = GuardedSSLSocket

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        return self.socket.accept()  # type: ignore[union-attr]  # TLS: in finish_request

    def process_request(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0])
        with self._lock:
            refused = (f"{self._unfinished[host]} handshakes from {host} under way"
                       if self._unfinished[host] >= self.limits.per_host else
                       f"{sum(self._unfinished.values())} handshakes under way"
                       if sum(self._unfinished.values()) >= self.limits.total else None)
            if refused is None:
                self._unfinished[host] += 1
        if refused is not None:
            log.warning("connection_refused", host=host, reason=refused)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def _finished(self, host: str) -> Callable[[], None]:
        """The one call that gives ``host``'s handshake slot back (later calls do nothing)."""
        given_back = threading.Event()

        def done() -> None:
            if given_back.is_set():
                return
            given_back.set()
            with self._lock:
                self._unfinished[host] -= 1
                if self._unfinished[host] <= 0:
                    del self._unfinished[host]
        return done

    def finish_request(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0])
        done = self._finished(host)

        def guard_for(raw: Any) -> PduGuard:
            return PduGuard(raw, host, self.limits, done)

        try:
            if self.ssl_context is None:
                request = GuardedSocket(request, guard_for)
            else:
                request.settimeout(self.limits.handshake)
                try:
                    request = self.ssl_context.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("tls_handshake_failed", host=host, reason=why(exc))
                    request.close()
                    return
                request.guard(guard_for)
            super().finish_request(request, client_address)
        finally:
            if not isinstance(request, GuardedSocket | GuardedSSLSocket):
                done()  # no guard took the slot

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's handler failed: one JSON event (socketserver prints a traceback)."""
        log.exception("connection_failed", host=str(client_address[0]))
