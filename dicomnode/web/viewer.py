"""The side-by-side viewer: each harmonised slice beside the source slice it was made from
(found through the derived instance's SourceImageSequence) and their difference, as PNG
rendered here, with window presets."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dicomnode.store.index import Index
from dicomnode.web import render
from dicomnode.web.context import context_of
from dicomnode.web.pages import not_found, page

IMAGES = ("source", "harmonised", "difference")


@dataclass(frozen=True)
class SlicePair:
    source: Path
    harmonised: Path
    frame: int  # 0-based, in both instances (a multi-frame series keeps its frames)


@dataclass(frozen=True)
class Pairing:
    source_uid: str
    harmonised_uid: str
    modality: str
    slices: tuple[SlicePair, ...]


def harmonised_of(index: Index, series_uid: str) -> tuple[str, str] | None:
    """(source, harmonised image series) for an original or a derived series, or None."""
    row = index.series(series_uid)
    if row is None:
        return None
    if row["kind"] == "derived":
        return (row["source_series_uid"], series_uid) if row["source_series_uid"] else None
    images = [uid for uid in index.derived_series(series_uid)
              if (index.series(uid)["modality"] or "") != "SR"]
    return (series_uid, images[0]) if images else None


@functools.lru_cache(maxsize=16)
def _pairing(index: Index, source_uid: str, harmonised_uid: str, instances: int,
             updated: float) -> Pairing:
    """The harmonised series' slices, each with its source (cached while the series'
    instance count and update time stay the same)."""
    data_dir = index.path.parent
    slices = []
    modality = ""
    for rel in index.series_files(harmonised_uid):
        ds = dcmread(data_dir / rel, stop_before_pixels=True)
        modality = str(ds.get("Modality", ""))
        refs = ds.get("SourceImageSequence") or []
        source = index.instance(str(refs[0].ReferencedSOPInstanceUID)) if refs else None
        if source is None:
            continue
        slices.extend(SlicePair(data_dir / source["path"], data_dir / rel, frame)
                      for frame in range(render.frame_count(ds)))
    return Pairing(source_uid, harmonised_uid, modality, tuple(slices))


def pairing(index: Index, series_uid: str) -> Pairing | None:
    pair = harmonised_of(index, series_uid)
    if pair is None:
        return None
    row = index.series(pair[1])
    return _pairing(index, *pair, row["instances"], row["updated_at"])


def _slice(pairing: Pairing, request: Request) -> int:
    try:
        number = int(request.query_params.get("slice", len(pairing.slices) // 2 + 1))
    except ValueError:
        number = 1
    return min(max(number, 1), len(pairing.slices))


def viewer_page(request: Request) -> Response:
    ctx = context_of(request)
    uid = request.path_params["uid"]
    found = pairing(ctx.index, uid)
    if found is None or not found.slices:
        return not_found(request, f"series {uid} has no harmonised slices to show")
    number = _slice(found, request)
    names = render.presets(found.modality)
    preset = request.query_params.get("preset", names[0])
    return page(request, "viewer.html", pairing=found, number=number, preset=preset,
                presets=names, images=IMAGES, uid=uid)


def viewer_image(request: Request) -> Response:
    """One picture of slice ``number``: source, harmonised or their difference; one window
    (the preset, or auto from the source) for both, so grey levels compare."""
    ctx = context_of(request)
    found = pairing(ctx.index, request.path_params["uid"])
    image = request.path_params["image"]
    if found is None or not found.slices or image not in IMAGES:
        return Response(status_code=404)
    pair = found.slices[min(max(request.path_params["number"], 1), len(found.slices)) - 1]
    source = dcmread(pair.source)
    before = render.modality_values(source, pair.frame)
    window = render.preset_window(request.query_params.get("preset", ""), found.modality,
                                  before)
    if image == "source":
        pixels = render.picture(source, before, window)
    else:
        harmonised = dcmread(pair.harmonised)
        after = render.modality_values(harmonised, pair.frame)
        pixels = render.picture(harmonised, after, window) if image == "harmonised" \
            else render.difference(before, after, window.width / 4)
    return Response(render.encode(pixels), media_type=render.MEDIA_TYPES["png"],
                    headers={"Cache-Control": "no-store"})


ROUTES = [
    Route("/series/{uid}/viewer", viewer_page),
    Route("/series/{uid}/viewer/{number:int}/{image}.png", viewer_image),
]
