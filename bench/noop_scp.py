"""A pynetdicom Storage SCP that answers Success without storing: the receive floor.

``bench/receive.py`` runs it beside dcmtk's storescp and the node, so the report shows how
much of the gap to storescp is pynetdicom's own per-image cost (its DUL and DIMSE layers in
Python) and how much is the node's durable store. Same PDU size and reactor nap as the node.

    python3 bench/noop_scp.py PORT
"""

from __future__ import annotations

import sys

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import sop_class as sc

from dicomnode.config import NodeSettings
from dicomnode.scp import handle_conn_open


def main() -> None:
    ae = AE(ae_title="NOOP")
    ae.maximum_pdu_size = NodeSettings.max_pdu_size  # the node's default, as bench runs it
    ae.add_supported_context(sc.CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(sc.Verification)
    handlers = [(evt.EVT_C_STORE, lambda event: 0x0000),
                (evt.EVT_CONN_OPEN, handle_conn_open, [None])]
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=handlers)


if __name__ == "__main__":
    main()
