"""What the DICOMweb services share: error answers, the URLs of what they serve, the
Query a path's UIDs select, and multipart/related bodies (PS3.18 8.7.1)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dicomnode.store.query import Key, Query, attribute_tag

PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
CHUNK = 1 << 20


def problem(status: int, message: str) -> Response:
    """An error answer: the reason as JSON (PS3.18 leaves its body to the server)."""
    return JSONResponse({"error": message}, status)


def base_url(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}{PREFIX}"


def resource_url(request: Request, study: str, series: str | None = None,
                 instance: str | None = None) -> str:
    url = f"{base_url(request)}/studies/{study}"
    if series:
        url += f"/series/{series}"
        if instance:
            url += f"/instances/{instance}"
    return url


PATH_KEYS = (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"),
             ("instance", "SOPInstanceUID"))


def path_keys(request: Request) -> tuple[Key, ...]:
    """The unique keys a resource path names (its study, series, instance UIDs)."""
    params = request.path_params
    return tuple(Key(keyword, "UI", params[name]) for name, keyword in PATH_KEYS
                 if name in params)


def path_query(request: Request, level: str) -> Query:
    return Query(level, path_keys(request))


def multipart(parts: Iterable[tuple[dict[str, str], Iterable[bytes]]], boundary: str
              ) -> Iterator[bytes]:
    """A multipart/related body from (headers, body chunks) parts, streamed."""
    for headers, body in parts:
        yield f"--{boundary}\r\n".encode()
        yield "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n"
        yield from body
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def new_boundary() -> str:
    return f"dicomnode-{secrets.token_hex(12)}"


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def _json_value(vr: str, value: Any) -> Any:
    """One value, as C-FIND's answer has it (numbers for IS, US, FL...), in DICOM JSON."""
    if vr == "PN":
        return {"Alphabetic": str(value)}
    if vr == "DS":  # kept as text by the C-FIND answer; a number in JSON
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return value


def dicom_json(values: Iterable[tuple[str, str, Any]]) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) of ``(keyword or tag, VR, value)`` attributes, such as
    :func:`dicomnode.store.query.response_values` gives; a None value is an empty one."""
    out = {}
    for keyword, vr, value in values:
        tag = attribute_tag(keyword)
        if tag is None:
            continue
        element: dict[str, Any] = {"vr": vr}
        items = value if isinstance(value, list) else [] if value is None else [value]
        if items and vr != "SQ":
            element["Value"] = [_json_value(vr, v) for v in items]
        out[f"{tag:08X}"] = element
    return dict(sorted(out.items()))
