"""The pynetdicom internals the node relies on, in one place, each checked by
``tests/unit/test_pynetdicom_compat.py`` against the pinned pynetdicom range.

pynetdicom offers no public option for these; each is a documented trade-off here:

* the DUL reactor's idle nap (``DULServiceProvider._run_loop_delay``, 1 ms): every
  C-STORE response waits for it, so the listening side shortens it;
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

import socket
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import _config, dimse_messages
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import ThreadedAssociationServer

# The pynetdicom releases these internals were tested with (also pinned in pyproject.toml)
TESTED_VERSIONS = ">=3.0.4,<3.1"
INCOMING_PREFIX = "rx-"  # names of data sets being received (see receive_with)

# pynetdicom's DUL reactor sleeps this long whenever it finds no event (1 ms by default, its
# documented latency/idle-CPU trade-off): a peer waiting for each C-STORE response waits for
# it too, so a shorter nap lets a single association carry ~12% more images per second.
DUL_IDLE_SLEEP = 0.0001


def shorten_idle_sleep(dul: DULServiceProvider, seconds: float = DUL_IDLE_SLEEP) -> None:
    """Make one association's reactor nap ``seconds`` when idle."""
    dul._run_loop_delay = seconds


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
