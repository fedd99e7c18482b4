"""Upper-layer PDUs (PS3.8 9.3) written by hand, for tests that speak to the node over a raw
socket what no well-behaved DICOM library would send."""

from __future__ import annotations

import socket
import struct
import time

from pydicom.uid import ExplicitVRLittleEndian

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def associate_rq(called: str = "HARMONISE", calling: str = "FUZZER", *,
                 contexts: tuple[tuple[str, str], ...] = ((VERIFICATION, ExplicitVRLittleEndian),),
                 application_context: bool = True, max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``(abstract syntax, transfer syntax)`` contexts."""
    items = _item(0x10, _uid(APPLICATION_CONTEXT)) if application_context else b""
    for n, (abstract, syntax) in enumerate(contexts):
        items += _item(0x20, struct.pack(">BBBB", 2 * n + 1, 0, 0, 0)
                       + _item(0x30, _uid(abstract)) + _item(0x40, _uid(syntax)))
    items += _item(0x50, _item(0x51, struct.pack(">L", max_pdu))
                   + _item(0x52, _uid("1.2.826.0.1.3680043.9.7433.9.1")))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + bytes(32) + items)
    return pdu(0x01, body)


def p_data(context_id: int, fragment: bytes, command: bool, last: bool) -> bytes:
    """A P-DATA-TF with one PDV."""
    header = (1 if command else 0) | (2 if last else 0)
    return pdu(0x04, struct.pack(">LBB", len(fragment) + 2, context_id, header) + fragment)


RELEASE_RQ = pdu(0x05, bytes(4))
ABORT = pdu(0x07, bytes(4))


class Raw:
    """A TCP connection to the node that says exactly what a test tells it to."""

    def __init__(self, port: int, source: str | None = None) -> None:
        """Connect to the node on loopback, from the ``source`` loopback address (another
        host, as far as the node can tell) where given."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(source, 0) if source else None)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def drip(self, data: bytes, interval: float) -> None:
        for i in range(len(data)):
            self.sock.sendall(data[i:i + 1])
            time.sleep(interval)

    def read_pdu(self, timeout: float = 5) -> tuple[int, bytes] | None:
        """The next PDU the node sends (type, body), None when it closed the connection."""
        self.sock.settimeout(timeout)
        header = self._exact(6)
        if len(header) < 6:
            return None
        kind, _, length = struct.unpack(">BBL", header)
        return kind, self._exact(length)

    def closed_by_node(self, timeout: float = 5) -> bool:
        """Whether the node ends the connection (after whatever it still sends) in time."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    def _exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
