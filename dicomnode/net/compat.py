"""The pynetdicom internals the node relies on, in one place, each checked by
``tests/unit/test_pynetdicom_compat.py`` against the pinned pynetdicom range.

pynetdicom offers no public option for these; each is a documented trade-off here:

* the reactors' naps: an association's DUL thread sleeps ``_run_loop_delay`` (1 ms)
  whenever it finds nothing to do, and its service thread sleeps a fixed 1 ms every turn
  (``time.sleep(0.001)`` in ``Association._run_reactor``); a peer waiting for each C-STORE
  response waits for both. :func:`wake_on_work` gives both modules a ``time`` whose
  reactor naps end when there is work: the service thread's when a DIMSE message has been
  decoded (``EVT_DIMSE_RECV``), the DUL thread's when data arrives on its socket, and
  while a response is being prepared the DUL looks for it every 0.1 ms. An idle
  association naps as long as in pynetdicom, so waiting costs no more CPU;
* where C-STORE data sets are written as they arrive (``STORE_RECV_CHUNKED_DATASET``
  writes them with ``dimse_messages.NamedTemporaryFile`` into the process's temporary
  folder): the node points that one name at its own incoming files
  (:mod:`dicomnode.store.incoming`), on the spool's file system, so a received file is
  renamed into the spool rather than copied, and each is known by its association
  (decoded in that association's DUL thread, whose ``assoc`` it is);
* servers started with ``AE.make_server`` (the TLS acceptor) are registered in
  ``AE._servers`` as ``AE.start_server`` does, so ``AE.shutdown`` stops them too;
* in an ``EVT_REQUESTED`` handler, the A-ASSOCIATE-RQ being judged is
  ``assoc.requestor.primitive`` (its titles and proposed contexts, which the handler may
  reorder), and a rejection is ``assoc.acse.send_reject`` followed by marking the
  association rejected and killing it, so pynetdicom does not negotiate it after all;
* an association's TCP socket is ``assoc.dul.socket.socket``.
"""

from __future__ import annotations

import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from pynetdicom import _config, dimse_messages, evt
from pynetdicom import association as association_module
from pynetdicom import dul as dul_module
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import ThreadedAssociationServer

# The pynetdicom releases these internals were tested with (also pinned in pyproject.toml)
TESTED_VERSIONS = ">=3.0.4,<3.1"
INCOMING_PREFIX = "rx-"  # names of data sets being received (see receive_with)

REACTOR_NAP = 0.001       # pynetdicom's reactor naps: what wake_on_work ends early
RESPONSE_NAP = 0.0001     # the DUL's nap while its association prepares a response
SEND_GRACE = 0.002        # how long after a message is handed over the DUL keeps looking


class _Wake:
    """What an association's reactors wait for: a decoded message (the service thread),
    a response being prepared (the DUL)."""

    __slots__ = ("event", "received", "sent")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received = 0.0  # when the last message was decoded
        self.sent = 0.0      # when the last response was handed to the DUL

    def responding(self, now: float) -> bool:
        """Whether a response is being prepared or was just handed over."""
        return self.received > self.sent or now - self.sent < SEND_GRACE


_WAKES: weakref.WeakKeyDictionary[Association, _Wake] = weakref.WeakKeyDictionary()
_WAKES_LOCK = threading.Lock()


def _wake(assoc: Association) -> _Wake:
    with _WAKES_LOCK:
        wake = _WAKES.get(assoc)
        if wake is None:
            wake = _WAKES[assoc] = _Wake()
        return wake


def _message_decoded(event: Any) -> None:
    wake = _wake(event.assoc)
    wake.received = time.monotonic()
    wake.event.set()


def _message_sent(event: Any) -> None:
    _wake(event.assoc).sent = time.monotonic()


def wake_handlers() -> list[tuple[Any, Any]]:
    """The event handlers every association needs for :func:`wake_on_work`."""
    return [(evt.EVT_DIMSE_RECV, _message_decoded), (evt.EVT_DIMSE_SENT, _message_sent)]


class _ReactorTime:
    """pynetdicom's ``time`` module as its reactor threads see it: a nap of
    :data:`REACTOR_NAP` or less ends early when there is work; anything else is the real
    ``time``."""

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if seconds > REACTOR_NAP:
            time.sleep(seconds)
        elif isinstance(thread, Association):
            self._service_nap(thread, seconds)
        elif isinstance(thread, DULServiceProvider):
            self._dul_nap(thread, seconds)
        else:
            time.sleep(seconds)

    @staticmethod
    def _service_nap(assoc: Association, seconds: float) -> None:
        wake = _WAKES.get(assoc)
        if wake is None:
            time.sleep(seconds)
        elif wake.event.wait(seconds):
            wake.event.clear()

    @staticmethod
    def _dul_nap(dul: DULServiceProvider, seconds: float) -> None:
        if not dul.to_provider_queue.empty():
            return
        wake = _WAKES.get(dul.assoc)
        if wake is not None and wake.responding(time.monotonic()):
            time.sleep(RESPONSE_NAP)
            return
        sock = dul.socket.socket if dul.socket is not None else None
        try:
            select.select([sock], [], [], seconds) if sock is not None else time.sleep(seconds)
        except (OSError, ValueError):  # closed under us: the reactor sees it next turn
            time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def wake_on_work() -> None:
    """Reactor naps that end when there is work (bind :func:`wake_handlers` too)."""
    reactor_time = _ReactorTime()
    dul_module.time = reactor_time
    association_module.time = reactor_time


def receive_with(open_file: Callable[..., Any]) -> None:
    """Have pynetdicom write each C-STORE data set as its fragments arrive, instead of
    collecting it in memory (a 600 MB instance took 1.2 GB), into the file ``open_file``
    returns (called with ``NamedTemporaryFile``'s arguments, in the receiving
    association's reactor thread: :func:`receiving_association`). Process-wide for
    pynetdicom's DIMSE decoding only: Python's own temporary files are left alone."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = open_file


def receiving_association() -> Association | None:
    """The association whose data set is being decoded: pynetdicom decodes P-DATA in the
    association's DUL reactor thread, which knows its association."""
    return getattr(threading.current_thread(), "assoc", None)


def abort_from_reactor(assoc: Association) -> None:
    """Abort ``assoc`` from inside its own reactor (a failed write while decoding): the
    A-ABORT is queued for the reactor to send once the current step returns."""
    assoc.abort(block=False)


def accept_any_storage() -> None:
    """pynetdicom's unrestricted storage service: every storage class proposed is accepted."""
    _config.UNRESTRICTED_STORAGE_SERVICE = True


def register_server(ae: ApplicationEntity, server: ThreadedAssociationServer) -> None:
    """Have ``AE.shutdown`` stop ``server`` (made with ``AE.make_server``), as it does the
    ones ``AE.start_server`` starts."""
    ae._servers.append(server)


def association_request(assoc: Association) -> Any:
    """The A-ASSOCIATE-RQ primitive an ``EVT_REQUESTED`` handler judges: its
    ``calling_ae_title``, ``called_ae_title`` and (mutable)
    ``presentation_context_definition_list``."""
    return assoc.requestor.primitive


def reject(assoc: Association, result: int, source: int, reason: int) -> None:
    """Answer the association being requested with A-ASSOCIATE-RJ (in ``EVT_REQUESTED``)."""
    assoc.acse.send_reject(result, source, reason)
    assoc.is_rejected = True
    assoc.kill()


def tcp_socket(assoc: Association) -> socket.socket | None:
    """The association's TCP socket, None once it is closed."""
    sock = assoc.dul.socket
    return sock.socket if sock is not None else None
