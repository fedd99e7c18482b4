"""STOW-RS (PS3.18 10.5): instances POSTed as multipart/related application/dicom (Part 10
files), each stored through the node's one durable receive path
(:func:`dicomnode.store.ingest.receive_file`: the acceptance rule of
:mod:`pipelines.structure`, durable file, index row) before the answer is sent; each
refusal with the DIMSE status a C-STORE would get. Every request is audited.

The body streams into files in ``data_dir/incoming`` (emptied at start-up, like a
C-STORE's), checked against the disk reserve as it arrives.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import dcmread, read_file_meta_info
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dicomnode import metrics
from dicomnode.log import get_logger
from dicomnode.net.status import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from dicomnode.store.files import StorageFull, check_free_space, ensure_dir
from dicomnode.store.ingest import RejectedInstance, receive_file
from dicomnode.web.auth import client_of, user_of
from dicomnode.web.context import WebContext, context_of
from dicomnode.web.dicomweb.common import DICOM_JSON, problem, resource_url

log = get_logger("dicomweb")
VIA = "dicomweb"
PREFIX = "stow-"


@dataclass
class Part:
    """One part of the body, written to ``path`` as it arrives."""

    path: Path
    headers: dict[str, str] = field(default_factory=dict)
    refused: str | None = None  # why it was not written whole


class Receiver:
    """The multipart parser's callbacks: each part into its own incoming file."""

    def __init__(self, ctx: WebContext, boundary: bytes) -> None:
        self.folder = ctx.config.incoming_dir
        self.reserve = ctx.config.node.disk_reserve_mb * 2**20
        self.parts: list[Part] = []
        self._fh: Any = None
        self._field = b""
        self._value = b""
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data,
            "on_part_end": self._end, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end})

    def _begin(self) -> None:
        ensure_dir(self.folder)
        self._fh = tempfile.NamedTemporaryFile(dir=self.folder, prefix=PREFIX, delete=False)  # noqa: SIM115
        self.parts.append(Part(Path(self._fh.name)))

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self.parts[-1].headers[self._field.decode("latin-1").strip().lower()] = \
            self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        if part.refused:
            return
        try:
            check_free_space(self.folder, end - start, self.reserve)
            self._fh.write(data[start:end])
        except (StorageFull, OSError) as exc:
            part.refused = str(exc) if isinstance(exc, StorageFull) else \
                f"{exc.strerror or exc}"

    def _end(self) -> None:
        self._fh.close()

    def close(self) -> None:
        """Remove every part file still here (stored ones were moved into the spool)."""
        if self._fh is not None:
            self._fh.close()
        for part in self.parts:
            part.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Outcome:
    sop_class: str
    sop_instance: str
    status: int
    reason: str = ""
    study: str = ""
    series: str = ""


def store_part(ctx: WebContext, part: Part, study: str | None) -> Outcome:
    """Store one part the way a C-STORE is stored; its outcome with a DIMSE status."""
    config = ctx.config
    node = config.node
    kind = parse_options_header(part.headers.get("content-type", "application/dicom"))[0]
    if part.refused:
        return Outcome("", "", OUT_OF_RESOURCES, part.refused)
    if kind != b"application/dicom":
        return Outcome("", "", CANNOT_UNDERSTAND, f"a part of type {kind.decode()} (only"
                       " application/dicom Part 10 files are stored)")
    try:
        meta = read_file_meta_info(part.path)
        ts, sop_class = str(meta.TransferSyntaxUID), str(meta.MediaStorageSOPClassUID)
        sop_uid = str(meta.MediaStorageSOPInstanceUID)
    except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError):
        return Outcome("", "", CANNOT_UNDERSTAND, "not a DICOM Part 10 file with file meta"
                       " information")
    if study is not None:
        header: Dataset = dcmread(part.path, stop_before_pixels=True,
                                  specific_tags=["StudyInstanceUID"])
        if str(header.get("StudyInstanceUID", "")) != study:
            return Outcome(sop_class, sop_uid, DATASET_MISMATCH, "the instance is not of the"
                           f" study {study} the request names")
    try:
        stored = receive_file(part.path, index=ctx.index, data_dir=node.data_dir,
                              root=config.spool_dir, reserve_bytes=node.disk_reserve_mb * 2**20,
                              duplicate_policy=node.duplicate_policy, transfer_syntax=ts,
                              affected_sop_class=sop_class, affected_sop_instance=sop_uid)
    except RejectedInstance as exc:
        return Outcome(sop_class, sop_uid, exc.status, str(exc))
    except StorageFull as exc:
        return Outcome(sop_class, sop_uid, OUT_OF_RESOURCES, str(exc))
    except (OSError, sqlite3.Error) as exc:
        return Outcome(sop_class, sop_uid, OUT_OF_RESOURCES, type(exc).__name__)
    metrics.received(VIA, stored.size)
    rec = stored.record
    log.info("instance_stored", sop_instance_uid=rec.sop_instance_uid,
             series_uid=rec.series_uid, study_uid=rec.study_uid, bytes=stored.size,
             transfer_syntax=ts, action=stored.action, via=VIA)
    return Outcome(sop_class, sop_uid, SUCCESS, study=rec.study_uid, series=rec.series_uid)


def _answer(request: Request, outcomes: list[Outcome], study: str | None) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 10.5.3.1) as DICOM JSON."""
    ds = Dataset()
    studies = {o.study for o in outcomes if o.status == SUCCESS}
    if study or len(studies) == 1:
        ds.RetrieveURL = resource_url(request, study or studies.pop())
    ds.ReferencedSOPSequence = []
    ds.FailedSOPSequence = []
    for o in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = o.sop_class, o.sop_instance
        if o.status == SUCCESS:
            item.RetrieveURL = resource_url(request, o.study, o.series, o.sop_instance)
            ds.ReferencedSOPSequence.append(item)
        else:
            item.FailureReason = o.status
            ds.FailedSOPSequence.append(item)
    if not ds.FailedSOPSequence:
        del ds.FailedSOPSequence
    return ds.to_json_dict()


async def store(request: Request) -> Response:
    ctx = context_of(request)
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/related" or not boundary:
        return problem(415, "STOW-RS takes multipart/related; type=\"application/dicom\"")
    size = int(request.headers.get("content-length") or 0)
    try:
        await run_in_threadpool(check_free_space, ctx.config.incoming_dir, size,
                                ctx.config.node.disk_reserve_mb * 2**20)
    except StorageFull as exc:
        return problem(507, str(exc))
    receiver = Receiver(ctx, boundary)
    study = request.path_params.get("study")
    try:
        async for chunk in request.stream():
            await run_in_threadpool(receiver.parser.write, chunk)
        receiver.parser.finalize()
        outcomes = [await run_in_threadpool(store_part, ctx, part, study)
                    for part in receiver.parts]
    finally:
        await run_in_threadpool(receiver.close)
    for o in outcomes:
        metrics.STORE_RESULTS.labels(VIA, f"0x{o.status:04X}").inc()
        if o.status != SUCCESS:
            log.warning("instance_rejected", sop_instance_uid=o.sop_instance or None,
                        reason=o.reason, status=f"0x{o.status:04X}", via=VIA)
    stored = sum(o.status == SUCCESS for o in outcomes)
    await run_in_threadpool(
        ctx.audit.record, user_of(request), client_of(request), "stow",
        f"{stored} stored, {len(outcomes) - stored} refused",
        study_uids=sorted({o.study for o in outcomes if o.study}),
        refused=[o.sop_instance for o in outcomes if o.status != SUCCESS and o.sop_instance])
    status = 200 if stored == len(outcomes) and outcomes else 409 if not stored else 202
    return Response(json.dumps(_answer(request, outcomes, study)), status,
                    media_type=DICOM_JSON)


ROUTES = [Route("/studies", store, methods=["POST"]),
          Route("/studies/{study}", store, methods=["POST"])]
