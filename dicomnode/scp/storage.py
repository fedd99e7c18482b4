"""Storage SCP: C-STORE of every storage SOP class, stored byte for byte, Success only
once the instance is durable and indexed (:func:`dicomnode.store.ingest.receive_file`)."""

from __future__ import annotations

import sqlite3

from pynetdicom import evt

from dicomnode import metrics
from dicomnode.log import get_logger
from dicomnode.net.status import OUT_OF_RESOURCES, SOP_CLASS_NOT_SUPPORTED, SUCCESS
from dicomnode.scp.context import ScpContext
from dicomnode.store.files import StorageFull
from dicomnode.store.ingest import RejectedInstance, receive_file

log = get_logger("scp")


@metrics.counts_store_status("dimse")
def handle_store(event: evt.Event, ctx: ScpContext) -> int:
    """Store one instance byte for byte; Success only once it is on disk and indexed.
    pynetdicom has written it to a file already (:func:`dicomnode.net.compat.receive_with`)."""
    request = event.request
    ts = str(event.context.transfer_syntax)
    node = ctx.config.node
    negotiated = str(event.context.abstract_syntax)
    if str(request.AffectedSOPClassUID) != negotiated:
        log.warning("instance_rejected", sop_instance_uid=str(request.AffectedSOPInstanceUID),
                    calling_ae=event.assoc.requestor.ae_title.strip(),
                    reason=f"C-STORE of SOP class {request.AffectedSOPClassUID} on a"
                    f" presentation context for {negotiated}",
                    status=f"0x{SOP_CLASS_NOT_SUPPORTED:04X}")
        return SOP_CLASS_NOT_SUPPORTED
    refusal = ctx.incoming.refusal(event.dataset_path)
    if refusal is not None:
        log.error("instance_refused_disk_full",
                  sop_instance_uid=str(request.AffectedSOPInstanceUID), reason=refusal)
        return OUT_OF_RESOURCES
    try:
        outcome = receive_file(event.dataset_path, index=ctx.receipts, data_dir=ctx.data_dir,
                               root=ctx.config.spool_dir,
                               reserve_bytes=node.disk_reserve_mb * 2**20,
                               duplicate_policy=node.duplicate_policy, transfer_syntax=ts,
                               affected_sop_class=str(request.AffectedSOPClassUID),
                               affected_sop_instance=str(request.AffectedSOPInstanceUID),
                               written=ctx.incoming.written(event.dataset_path))
    except RejectedInstance as exc:
        log.warning("instance_rejected", sop_instance_uid=str(request.AffectedSOPInstanceUID),
                    calling_ae=event.assoc.requestor.ae_title.strip(), reason=str(exc),
                    error_type=exc.error, tag=exc.tag, status=f"0x{exc.status:04X}")
        return exc.status
    except StorageFull as exc:
        log.error("instance_refused_disk_full",
                  sop_instance_uid=str(request.AffectedSOPInstanceUID), reason=str(exc))
        return OUT_OF_RESOURCES
    except (OSError, sqlite3.Error) as exc:  # transient: the peer may retry later
        log.error("instance_store_failed", sop_instance_uid=str(request.AffectedSOPInstanceUID),
                  error_type=type(exc).__name__, reason=str(exc))
        return OUT_OF_RESOURCES
    rec = outcome.record
    if rec.notes:
        log.warning("instance_nonconformant", sop_instance_uid=rec.sop_instance_uid,
                    series_uid=rec.series_uid, notes=list(rec.notes))
    metrics.received("dimse", outcome.size)
    log.info("instance_stored", sop_instance_uid=rec.sop_instance_uid,
             series_uid=rec.series_uid, study_uid=rec.study_uid, bytes=outcome.size,
             transfer_syntax=ts, action=outcome.action, reopened_series=outcome.reopened)
    return SUCCESS
