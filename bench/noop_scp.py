"""A pynetdicom Storage SCP that answers Success after the first steps of the node's receive.

``bench/receive.py`` runs it beside dcmtk's storescp and the node, so the report shows how
much of the gap to storescp is pynetdicom's own per-image cost (its DUL and DIMSE layers in
Python) and how much is the node's durable store. Same PDU size and reactor naps as the node.

``--upto`` stops after one of the node's steps, each with the node's own code
(:func:`dicomnode.net.compat.receive_with`, :func:`dicomnode.store.ingest.parse_header`,
:func:`dicomnode.store.files.move_into_place`), so consecutive steps side by side price each one:

* ``nothing`` (default): the data set is collected in memory and dropped: the floor;
* ``file``: pynetdicom writes it to a file as its fragments arrive, as the node has it do;
* ``parse``: its header is parsed and checked;
* ``digest``: its SHA-256 is taken;
* ``flush``: it is flushed and renamed into a spool folder, the folder flushed;

what the node does beyond that is indexing the instance (a committed SQLite row) and
logging it.

    python3 bench/noop_scp.py PORT [--upto nothing|file|parse|digest|flush] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import sop_class as sc

from dicomnode.config import NodeSettings
from dicomnode.net.compat import receive_with, wake_handlers, wake_on_work
from dicomnode.scp.association import handle_conn_open
from dicomnode.store.files import ensure_dir, instance_path, move_into_place
from dicomnode.store.incoming import IncomingFiles
from dicomnode.store.ingest import parse_header

STEPS = ("nothing", "file", "parse", "digest", "flush")


def store_handler(upto: str, spool: Path):
    """A C-STORE handler that runs the node's receive steps up to ``upto``."""
    steps = STEPS.index(upto)

    def handle(event: evt.Event) -> int:
        if steps < STEPS.index("parse"):
            return 0x0000
        source = Path(event.dataset_path)
        record = parse_header(source, str(event.context.transfer_syntax))
        if steps >= STEPS.index("digest"):
            with source.open("rb") as fh:
                hashlib.file_digest(fh, "sha256")
        if steps >= STEPS.index("flush"):
            move_into_place(source, instance_path(spool, record.study_uid, record.series_uid,
                                                  record.sop_instance_uid))
        return 0x0000

    return handle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--upto", choices=STEPS, default="nothing")
    ap.add_argument("--dir", type=Path, help="where received files go (default: a new"
                    " temporary folder, left for the caller to remove)")
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="noop-scp-"))
    if args.upto != "nothing":
        ensure_dir(work / "incoming")
        receive_with(IncomingFiles(work / "incoming", reserve_bytes=0).open)
    wake_on_work()  # the node's reactor naps
    ae = AE(ae_title="NOOP")
    ae.maximum_pdu_size = NodeSettings.max_pdu_size  # the node's default, as bench runs it
    ae.add_supported_context(sc.CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(sc.Verification)
    handlers = [(evt.EVT_C_STORE, store_handler(args.upto, work / "spool")),
                (evt.EVT_CONN_OPEN, handle_conn_open, [None]), *wake_handlers()]
    ae.start_server(("127.0.0.1", args.port), evt_handlers=handlers)


if __name__ == "__main__":
    main()
