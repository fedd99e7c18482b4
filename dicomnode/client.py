"""Outgoing associations: our AE as a client of peers (outbox sends, delivery checks).

:func:`held_by_peer` asks a peer by C-FIND whether it already holds instances: after a
crash, an instance whose C-STORE was in flight may or may not have arrived, and asking
is how the outbox avoids sending it twice.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, Association, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from pynetdicom.status import code_to_category

from dicomnode.config import Config, Peer
from dicomnode.tls import client_context
from pipelines import IMPLEMENTATION_CLASS_UID, implementation_version_name


class Unreachable(ConnectionError):
    """No association with the peer (down, or refusing us): try again later."""


def nodelay(event: evt.Event) -> None:
    """Disable Nagle on our outgoing associations: each small DIMSE message would
    otherwise wait for the peer's delayed ACK (40 ms on Linux) before it leaves."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def node_ae(config: Config) -> AE:
    """An AE with our title, our implementation's identity and the configured timeouts."""
    node = config.node
    ae = AE(ae_title=node.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = implementation_version_name()
    ae.acse_timeout, ae.dimse_timeout = node.acse_timeout, node.dimse_timeout
    ae.network_timeout = node.network_timeout
    return ae


def client_ae(config: Config) -> AE:
    """An AE for one outgoing association."""
    ae = node_ae(config)
    ae.connection_timeout = min(config.node.acse_timeout, 30.0)
    return ae


def transport(config: Config, peer: Peer) -> dict[str, Any]:
    """``AE.associate`` options for reaching ``peer``: TLS for a ``tls`` peer."""
    return {"tls_args": (client_context(config.tls), peer.host)} if peer.tls else {}


def associate(config: Config, peer: Peer, **options: Any) -> Association:
    """An association from our AE to ``peer`` (without Nagle; over TLS for a ``tls`` peer);
    ``options`` go to pynetdicom's ``AE.associate`` (``contexts``, ``max_pdu``). Check
    ``is_established``."""
    return client_ae(config).associate(peer.host, peer.port, ae_title=peer.ae_title,
                                       evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)],
                                       **transport(config, peer), **options)


def refusal(peer: Peer, assoc: Association) -> str:
    """Why an association with ``peer`` was not established, for logs and status."""
    return (f"association with {peer.ae_title} at {peer.host}:{peer.port}"
            f" {'rejected' if assoc.is_rejected else 'failed'}")


def association_problem(config: Config, peer: Peer, contexts: list[Any]) -> str | None:
    """Why an association with ``peer`` proposing ``contexts`` cannot be made, or None
    (it was opened and released again)."""
    assoc = associate(config, peer, contexts=contexts)
    if assoc.is_established:
        assoc.release()
        return None
    return refusal(peer, assoc)


def held_by_peer(config: Config, peer: Peer, instances: Iterable[tuple[str, str, str]]
                 ) -> set[str] | None:
    """Which of ``(study, series, SOP instance UID)`` the peer already holds, by Study
    Root C-FIND at IMAGE level; None when it offers no C-FIND (or cannot answer one).

    Verification is proposed too, so a peer that takes no C-FIND still accepts the
    association and says so, rather than looking down. Raises :class:`Unreachable`.
    """
    assoc = associate(config, peer, contexts=[
        build_context(Verification), build_context(StudyRootQueryRetrieveInformationModelFind)])
    if not assoc.is_established:
        raise Unreachable(refusal(peer, assoc))
    try:
        if not any(cx.abstract_syntax == StudyRootQueryRetrieveInformationModelFind
                   for cx in assoc.accepted_contexts):
            return None
        held = set()
        for study, series, sop in instances:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID, query.SeriesInstanceUID = study, series
            query.SOPInstanceUID = sop
            for status, found in assoc.send_c_find(query,
                                                   StudyRootQueryRetrieveInformationModelFind):
                category = code_to_category(status.Status) if "Status" in status else None
                if category == "Pending":
                    if found is not None and str(found.get("SOPInstanceUID", "")) == sop:
                        held.add(sop)
                elif category != "Success":
                    return None  # refused, failed or no answer: it cannot tell us
        return held
    finally:
        if assoc.is_established:
            assoc.release()
