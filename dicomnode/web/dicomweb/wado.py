"""WADO-RS (PS3.18 10.4): studies, series and instances as multipart/related
application/dicom, their metadata as DICOM JSON, frames as raw pixels and instances or
frames rendered as JPEG or PNG. The instances a path names are C-GET's
(:func:`dicomnode.store.lookup.retrieve_rows`).

Instances go out as stored when the client accepts any transfer syntax
(``transfer-syntax=*``) or the stored one; else, as the standard's default, in Explicit VR
Little Endian (decompressed where stored compressed); any other is 406.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from dicomnode.store.lookup import retrieve_rows
from dicomnode.store.query import QueryError
from dicomnode.web import render
from dicomnode.web.context import context_of
from dicomnode.web.dicomweb.common import (
    DICOM_JSON,
    file_chunks,
    multipart,
    new_boundary,
    path_query,
    problem,
)

LEVEL = {3: "IMAGE", 2: "SERIES", 1: "STUDY"}
ANY = "*"


def _rows(request: Request) -> list[Any]:
    query = path_query(request, LEVEL[len(request.path_params.keys() & {"study", "series",
                                                                        "instance"})])
    try:
        return retrieve_rows(context_of(request).index, query)
    except QueryError:
        return []


def wanted_syntax(accept: str) -> str | None:
    """The transfer syntax an Accept header asks instances in: ``*`` (as stored), a UID,
    or None for the default (Explicit VR Little Endian)."""
    for media in accept.split(","):
        if "application/dicom" in media or "*/*" in media:
            found = re.search(r'transfer-syntax\s*=\s*"?([0-9.*]+)"?', media)
            if found:
                return found.group(1)
            if "*/*" in media:
                return ANY
    return None


def _instance_bytes(path: Any, stored: str, wanted: str | None) -> Iterator[bytes] | None:
    """The instance's Part 10 bytes in the wanted syntax, or None if it cannot be."""
    if wanted in (ANY, stored):
        return file_chunks(path)
    if wanted not in (None, str(ExplicitVRLittleEndian)):
        return None
    ds = dcmread(path)
    if UID(stored).is_compressed:
        ds.decompress(generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return iter([out.getvalue()])


def retrieve(request: Request) -> Response:
    """A study, series or instance as multipart/related application/dicom."""
    rows = _rows(request)
    if not rows:
        return problem(404, "no such study, series or instance")
    data_dir = context_of(request).config.node.data_dir
    wanted = wanted_syntax(request.headers.get("accept", ""))
    if wanted not in (None, ANY, str(ExplicitVRLittleEndian)) and any(
            r["transfer_syntax"] != wanted for r in rows):
        return problem(406, f"instances are not available in transfer syntax {wanted}")
    boundary = new_boundary()
    ts = "" if wanted == ANY else f"; transfer-syntax={wanted or ExplicitVRLittleEndian}"

    def parts() -> Iterator[tuple[dict[str, str], Iterator[bytes]]]:
        for row in rows:
            body = _instance_bytes(data_dir / row["path"], row["transfer_syntax"], wanted)
            syntax = ts or f"; transfer-syntax={row['transfer_syntax']}"
            yield {"Content-Type": f"application/dicom{syntax}"}, body or iter(())

    return StreamingResponse(multipart(parts(), boundary), media_type=(
        f'multipart/related; type="application/dicom"; boundary={boundary}'))


def metadata(request: Request) -> Response:
    """Every instance's attributes as DICOM JSON, without its pixel data."""
    rows = _rows(request)
    if not rows:
        return problem(404, "no such study, series or instance")
    data_dir = context_of(request).config.node.data_dir
    body = [dcmread(data_dir / r["path"], stop_before_pixels=True).to_json_dict(
        bulk_data_threshold=1 << 20, bulk_data_element_handler=lambda _: "")
        for r in rows]
    return Response(json.dumps(body), media_type=DICOM_JSON)


def _frames(request: Request) -> list[int] | None:
    try:
        numbers = [int(n) for n in request.path_params["frames"].split(",")]
    except ValueError:
        return None
    return numbers if numbers and min(numbers) >= 1 else None


def _instance(request: Request) -> Dataset | None:
    rows = _rows(request)
    if len(rows) != 1:
        return None
    return dcmread(context_of(request).config.node.data_dir / rows[0]["path"])


def frames(request: Request) -> Response:
    """Frames as their decoded pixel values (little endian), multipart/related
    application/octet-stream."""
    ds, numbers = _instance(request), _frames(request)
    if ds is None or numbers is None or max(numbers) > render.frame_count(ds):
        return problem(404, "no such instance or frame")
    pixels = ds.pixel_array
    if render.frame_count(ds) == 1:
        pixels = pixels[np.newaxis]
    boundary = new_boundary()
    parts = (({"Content-Type": "application/octet-stream; transfer-syntax="
               f"{ExplicitVRLittleEndian}"},
              [np.ascontiguousarray(pixels[n - 1]).astype(pixels.dtype.newbyteorder("<"))
               .tobytes()]) for n in numbers)
    return StreamingResponse(multipart(parts, boundary), media_type=(
        f'multipart/related; type="application/octet-stream"; boundary={boundary}'))


def _window(request: Request, ds: Dataset, values: np.ndarray) -> render.Window:
    """``window=center,width[,function]`` (linear only), else the image's own."""
    asked = request.query_params.get("window")
    if asked:
        try:
            center, width = (float(v) for v in asked.split(",")[:2])
            if width > 0:
                return render.Window(center, width)
        except ValueError:
            pass
    return render.dicom_window(ds, values)


def rendered(request: Request) -> Response:
    """An instance's first frame, or the frame named, as JPEG (default) or PNG."""
    ds = _instance(request)
    numbers = _frames(request) if "frames" in request.path_params else [1]
    if ds is None or numbers is None or numbers[0] > render.frame_count(ds):
        return problem(404, "no such instance or frame")
    accept = request.headers.get("accept", "")
    kind = "png" if "image/png" in accept and "image/jpeg" not in accept else "jpeg"
    values = render.modality_values(ds, numbers[0] - 1)
    pixels = render.picture(ds, values, _window(request, ds, values))
    return Response(render.encode(pixels, kind), media_type=render.MEDIA_TYPES[kind])


STUDY = "/studies/{study}"
SERIES = STUDY + "/series/{series}"
INSTANCE = SERIES + "/instances/{instance}"
ROUTES = [
    *(Route(path, retrieve) for path in (STUDY, SERIES, INSTANCE)),
    *(Route(path + "/metadata", metadata) for path in (STUDY, SERIES, INSTANCE)),
    Route(INSTANCE + "/frames/{frames}", frames),
    Route(INSTANCE + "/rendered", rendered),
    Route(INSTANCE + "/frames/{frames}/rendered", rendered),
]
