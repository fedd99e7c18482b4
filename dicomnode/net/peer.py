"""Associations the node opens to its peers: one way to open, check and release them.

Every SCU path (outbox sends, delivery checks, storage commitment reports, C-MOVE
destinations, ``dicomnode echo``) goes through :func:`peer_association`, so each uses the
node's AE title, TLS for ``tls = true`` peers, and Nagle off, and none leaves an
association open. :func:`held_by_peer` asks a peer by C-FIND whether it already holds
instances: after a crash, an instance whose C-STORE was in flight may or may not have
arrived, and asking is how the outbox avoids sending it twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import Association, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from dicomnode.config import Config, Peer
from dicomnode.net.ae import client_ae, nodelay
from dicomnode.net.status import category, response_status
from dicomnode.tls import client_context


class Unreachable(ConnectionError):
    """No association with the peer (down, or refusing us): try again later. The message
    says which peer and whether it rejected us or could not be reached."""


def transport(config: Config, peer: Peer) -> dict[str, Any]:
    """``AE.associate`` options for reaching ``peer``: TLS for a ``tls`` peer."""
    return {"tls_args": (client_context(config.tls), peer.host)} if peer.tls else {}


def refusal(peer: Peer, assoc: Association) -> str:
    """Why an association with ``peer`` was not established, for logs and status."""
    return (f"association with {peer.ae_title} at {peer.host}:{peer.port}"
            f" {'rejected' if assoc.is_rejected else 'failed'}")


@contextmanager
def peer_association(config: Config, peer: Peer, contexts: Sequence[Any],
                     **options: Any) -> Iterator[Association]:
    """An established association from our AE to ``peer`` proposing ``contexts``, released
    when the block ends (also when it raises). ``options`` go to pynetdicom's
    ``AE.associate`` (``max_pdu``, ``ext_neg``). Raises :class:`Unreachable` when the
    peer rejects or cannot be reached."""
    assoc = client_ae(config).associate(peer.host, peer.port, ae_title=peer.ae_title,
                                        contexts=list(contexts),
                                        evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)],
                                        **transport(config, peer), **options)
    if not assoc.is_established:
        raise Unreachable(refusal(peer, assoc))
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def association_problem(config: Config, peer: Peer, contexts: Sequence[Any]) -> str | None:
    """Why an association with ``peer`` proposing ``contexts`` cannot be made, or None
    (it was opened and released again)."""
    try:
        with peer_association(config, peer, contexts):
            return None
    except Unreachable as exc:
        return str(exc)


def held_by_peer(config: Config, peer: Peer, instances: Iterable[tuple[str, str, str]]
                 ) -> set[str] | None:
    """Which of ``(study, series, SOP instance UID)`` the peer already holds, by Study
    Root C-FIND at IMAGE level; None when it offers no C-FIND (or cannot answer one).

    Verification is proposed too, so a peer that takes no C-FIND still accepts the
    association and says so, rather than looking down. Raises :class:`Unreachable`.
    """
    find = StudyRootQueryRetrieveInformationModelFind
    with peer_association(config, peer, [build_context(Verification),
                                         build_context(find)]) as assoc:
        if not any(cx.abstract_syntax == find for cx in assoc.accepted_contexts):
            return None
        held = set()
        for study, series, sop in instances:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID, query.SeriesInstanceUID = study, series
            query.SOPInstanceUID = sop
            for status, found in assoc.send_c_find(query, find):
                answer = category(response_status(status))
                if answer == "Pending":
                    if found is not None and str(found.get("SOPInstanceUID", "")) == sop:
                        held.add(sop)
                elif answer != "Success":
                    return None  # refused, failed or no answer: it cannot tell us
        return held
