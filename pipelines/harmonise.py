"""One series in, one derived series out: route, load, normalise, infer, write.

:func:`harmonise_series` is what the node's worker and ``dicomnode harmonise`` call. Problems
with the series itself (no route, inconsistent tags, geometry a volume cannot hold) come back
as an outcome with a one-line reason; problems with the model or the machine (bad weights,
a generator that fails, a full disk) raise a :class:`~pipelines.errors.PipelineError`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import structlog
from torch import nn

from pipelines import software_version
from pipelines.derived import Provenance, write_derived_series
from pipelines.errors import ModelError
from pipelines.grain import Grain, add_grain
from pipelines.inference import (
    Execution,
    InferenceSettings,
    choose_execution,
    resolve_device,
    run_generator,
)
from pipelines.intensity import Normalisation, denormalise, keep_source, normalise
from pipelines.model_folder import LoadedModel, load_model_folder, read_model_info
from pipelines.routing import Route, RoutingDecision, never_routed, route_series
from pipelines.series import (
    SeriesError,
    harmonisable_images,
    load_series,
    read_headers,
    readable_files,
)
from pipelines.spacing import resize_slices, working_shape
from pipelines.sr import write_algorithm_sr

log = structlog.get_logger(component="harmonise")

Status = Literal["harmonised", "unmatched", "rejected"]
# The node keeps choose_execution's decisions in data_dir/EXECUTION_CACHE, so the same model on
# the same machine always runs, and writes, the same way.
EXECUTION_CACHE = "execution.json"


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class SeriesOutcome:
    """What happened to one series; ``reason`` is one line fit for a status table."""

    status: Status
    series_uid: str
    reason: str
    route: str | None = None
    model: ModelRef | None = None
    derived_series_uid: str | None = None
    outputs: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = ()
    # load (headers, routing, model, pixels), inference (with normalisation), write
    seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None  # the algorithm SR, when asked for
    precision: str | None = None  # fp32 | bf16 | fp16, as recorded in the derived series
    tile: int = 0  # the CPU tile edge inference ran with (0: whole slices or as configured)


class ModelCache:
    """Loaded models by folder, weights sha256 and weights file stat; least recently used out.

    A changed or tampered weights file changes the key, so it is verified again on load.
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, folder: Path) -> LoadedModel:
        info = read_model_info(folder)
        try:
            stat = info.weights_path.stat()
        except OSError:
            raise ModelError(f"{info.weights_path}: weights file missing") from None
        key = (str(folder.resolve()), info.weights_sha256, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = load_model_folder(folder)
            self._models[key] = model
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return model

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


MODELS = ModelCache()


def choose_route(headers: Sequence, routes: Sequence[Route], route_name: str | None
                 ) -> RoutingDecision | Route | None:
    """The named route (``ValueError`` if unknown), else the routing decision."""
    if route_name is None:
        return route_series(headers, routes)
    for route in routes:
        if route.name == route_name:
            return route
    raise ValueError(f"no route named '{route_name}' (known: "
                     f"{', '.join(r.name for r in routes) or 'none'})")


def _model_modality(model: LoadedModel) -> str | None:
    value = model.info.source.get("Modality")
    return str(value) if value else None


@dataclass(frozen=True)
class Translation:
    """How :func:`translate_volume` ran: normalisation anchors, execution, working grid."""

    anchors: tuple[float, float]
    execution: Execution
    shape: tuple[int, int]  # rows, columns the generator saw


def translate_volume(generator: nn.Module, array: np.ndarray, norm: Normalisation, dims: int,
                     settings: InferenceSettings, *, spacing: Sequence[float] | None = None,
                     model_spacing: Sequence[float] | None = None,
                     padding: np.ndarray | None = None, name: str = "generator",
                     key: str | None = None, cache: Path | None = None,
                     grain: Grain | None = None) -> tuple[np.ndarray, Translation]:
    """Real values in, real values out, on the same grid: :func:`generate_volume`, then
    :func:`finish_volume`. The one path the node and the trainers' reports share."""
    output, translation = generate_volume(generator, array, norm, dims, settings,
                                          spacing=spacing, model_spacing=model_spacing,
                                          name=name, key=key, cache=cache)
    return finish_volume(array, output, translation, norm, padding, grain), translation


def generate_volume(generator: nn.Module, array: np.ndarray, norm: Normalisation, dims: int,
                    settings: InferenceSettings, *, spacing: Sequence[float] | None = None,
                    model_spacing: Sequence[float] | None = None, name: str = "generator",
                    key: str | None = None, cache: Path | None = None
                    ) -> tuple[np.ndarray, Translation]:
    """The generator's output in real values on the series' grid: normalise, resample to
    the model's ``model_spacing`` when it has one (``spacing`` is the series', mm, row then
    column), run, resample back, denormalise. ``key`` and ``cache`` go to
    :func:`~pipelines.inference.choose_execution`."""
    normalised, anchors = normalise(array, norm)
    shape = working_shape(array.shape[1:], spacing, model_spacing) if spacing is not None \
        else (array.shape[1], array.shape[2])
    work = resize_slices(normalised, shape)
    execution = choose_execution(generator, work, dims, settings, key=key, cache=cache)
    result = resize_slices(run_generator(generator, work, dims, settings, name=name,
                                         execution=execution), array.shape[1:])
    return denormalise(result, anchors), Translation(anchors, execution, shape)


def finish_volume(array: np.ndarray, output: np.ndarray, translation: Translation,
                  norm: Normalisation, padding: np.ndarray | None = None,
                  grain: Grain | None = None) -> np.ndarray:
    """Add the model's ``grain`` (MR magnitudes, :mod:`pipelines.grain`), then keep the
    source where the model has no say (:func:`~pipelines.intensity.keep_source`)."""
    if grain is not None:
        output = add_grain(output, grain)
    return keep_source(array, output, translation.anchors, norm, padding)


def harmonise_series(files: Sequence[Path], *, routes: Sequence[Route], models_dir: Path,
                     out_dir: Path, options: InferenceSettings | None = None,
                     route_name: str | None = None, model_name: str | None = None,
                     cache: ModelCache = MODELS, sr: bool = False,
                     execution_cache: Path | None = None,
                     when: datetime | None = None,
                     target_domain: str | None = None) -> SeriesOutcome:
    """Route, harmonise and write one series (all of ``files`` belong to it).

    A series dicomnode derived itself is ``unmatched`` with the reason "already harmonised by
    dicomnode (<model> <version>)", whatever is forced: the node archives it as it is; so is
    one of nothing but objects other than grayscale images, or of scouts only (``not
    harmonisable: <why>``). Such objects beside images are set aside, with a warning.
    ``route_name`` forces a route, ``model_name`` a model (no routing at all); ``sr`` also
    writes the companion algorithm SR (:func:`~pipelines.sr.write_algorithm_sr`);
    ``execution_cache`` is the file :func:`~pipelines.inference.choose_execution` keeps its
    per-model CPU decisions (precision, tiles) in (None: hardware and settings); ``when``
    is the processing time the derived series records (default now): a re-run given the same
    time writes the same bytes. A multi-domain model converts to the route's
    ``target_domain`` (with ``model_name``: to ``target_domain``). Raises
    :class:`~pipelines.errors.PipelineError` subclasses for model and runtime failures,
    ``ValueError`` for an unknown ``route_name``.
    """
    started = time.perf_counter()  # "load": headers, routing, model and pixels
    files, broken = readable_files(files)
    if not files:
        return SeriesOutcome("rejected", "", "; ".join(broken) or "no files")
    try:
        headers = read_headers(files)
    except SeriesError as exc:
        return SeriesOutcome("rejected", "", str(exc))
    uid = str(headers[0].get("SeriesInstanceUID", "")) if headers else ""
    bound = log.bind(series_uid=uid)
    # whatever route or model was asked for
    if done := never_routed(headers):
        return SeriesOutcome("unmatched", uid, done)
    route: Route | None = None
    if model_name is None:
        choice = choose_route(headers, routes, route_name)
        if isinstance(choice, RoutingDecision):
            if choice.flagged:
                return SeriesOutcome("rejected", uid, choice.summary())
            if choice.route is None:
                return SeriesOutcome("unmatched", uid, "no route matches")
            choice = choice.route
        route = choice
        model_name = route.model
    model = cache.get(Path(models_dir) / model_name)
    info = model.info
    ref = ModelRef(info.name, info.version, info.weights_sha256)
    route_label = route.name if route else None
    try:
        generator, domain = model.translator(route.target_domain if route else target_domain)
    except ModelError as exc:
        raise ModelError(f"route '{route.name}': {exc}" if route else str(exc)) from None
    first = harmonisable_images(headers)[0]
    expected, modality = _model_modality(model), str(first.get("Modality", ""))
    if expected and modality and expected.upper() != modality.upper():
        return SeriesOutcome("rejected", uid, f"model '{info.name}' is for {expected},"
                             f" series is {modality}", route_label, ref)
    try:
        volume = load_series(files)
    except SeriesError as exc:
        return SeriesOutcome("rejected", uid, str(exc), route_label, ref)
    loaded = time.perf_counter()
    settings = options or InferenceSettings()
    output, translation = translate_volume(
        generator, volume.array, info.normalisation, info.dims, settings,
        spacing=volume.spacing[1:], model_spacing=info.pixel_spacing, padding=volume.padding,
        name=f"model '{info.name}'", key=info.weights_sha256, cache=execution_cache,
        grain=info.grain)
    anchors, execution = translation.anchors, translation.execution
    inferred = time.perf_counter()
    provenance = Provenance(
        model_name=info.name, model_version=info.version, weights_sha256=info.weights_sha256,
        software_version=software_version(), route=route_label, when=when or datetime.now(UTC),
        target_domain=domain.name if domain else None,
        parameters={"architecture": info.architecture, "params": info.params,
                    "normalisation": info.normalisation.to_spec(), "anchors": list(anchors),
                    **({"grain": info.grain.to_spec()} if info.grain else {}),
                    **({"target_domain": domain.name, "style": list(domain.style)}
                       if domain else {}),
                    "inference": {"device": resolve_device(settings.device).type,
                                  "precision": execution.precision,
                                  "tile": execution.tile,
                                  **({"resampled_to": translation.shape}
                                     if translation.shape != volume.array.shape[1:] else {})}})
    derived_uid, paths = write_derived_series(volume, output, provenance, out_dir)
    report = write_algorithm_sr(paths, provenance, out_dir) if sr else None
    written = time.perf_counter()
    seconds = {"load": loaded - started, "inference": inferred - loaded,
               "write": written - inferred}
    bound.info("series_harmonised", derived_series_uid=derived_uid, model=info.name,
               model_version=info.version, route=route_label, instances=len(paths),
               execution=str(execution),
               **{f"{k}_s": round(v, 3) for k, v in seconds.items()})
    reason = f"harmonised {len(paths)} images with {info.name} {info.version}" + (
        f" to domain {domain.name}" if domain else "")
    warnings = (*volume.warnings, *(f"left out {line}" for line in broken))
    if warnings:
        reason += f" ({'; '.join(warnings)})"
    return SeriesOutcome("harmonised", uid, reason, route_label, ref, derived_uid,
                         tuple(paths), warnings, seconds, report, execution.precision,
                         execution.tile)

