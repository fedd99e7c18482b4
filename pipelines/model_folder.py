"""Model folders (``models_dir/NAME/``): ``model.json`` plus one weights file.

The trainers write them with :func:`save_model_folder`; the node reads them with
:func:`load_model_folder`, which refuses weights whose sha256 differs from the one
recorded in ``model.json``. docs/model-folder.md describes every field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from pipelines import software_version as _software_version
from pipelines.errors import ModelError
from pipelines.files import atomic_write
from pipelines.grain import Grain
from pipelines.intensity import Normalisation

# torch is imported where weights are read or written: listing and validating model folders
# (the node config, `models list`) stays light
if TYPE_CHECKING:
    import torch
    from torch import nn

log = structlog.get_logger(component="model_folder")

MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.pt"
FORMAT = 1
_REQUIRED = ("name", "version", "architecture", "params", "source", "target",
             "normalisation", "weights", "weights_sha256")


@dataclass(frozen=True)
class DomainStyle:
    """A scanner domain a multi-domain model converts to: its name, its reference style (the
    mean style code of its training series, which the generator's ``styles`` buffer holds
    too) and the DICOM tags that describe its series."""

    name: str
    style: tuple[float, ...]
    tags: dict[str, Any] = field(default_factory=dict)
    series: int = 0  # training series the style is the mean of

    def to_spec(self) -> dict[str, Any]:
        return {"name": self.name, "style": list(self.style), "tags": dict(self.tags),
                "series": self.series}

    @classmethod
    def from_spec(cls, spec: Any, style_dim: int) -> DomainStyle:
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) \
                or not spec["name"]:
            raise ValueError(f"a domain must be an object with a non-empty 'name', got {spec!r}")
        style = spec.get("style")
        if not isinstance(style, list) or len(style) != style_dim or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in style):
            raise ValueError(f"domain '{spec['name']}': 'style' must be {style_dim} finite"
                             " numbers (params style_dim)")
        tags = spec.get("tags", {})
        if not isinstance(tags, Mapping):
            raise ValueError(f"domain '{spec['name']}': 'tags' must be an object")
        return cls(spec["name"], tuple(float(v) for v in style), dict(tags),
                   int(spec.get("series", 0)))


@dataclass(frozen=True)
class ModelInfo:
    """What ``model.json`` says, validated; ``path`` is the model folder."""

    path: Path
    name: str
    version: str
    architecture: str
    params: dict[str, Any]
    source: dict[str, Any]
    target: dict[str, Any]
    normalisation: Normalisation
    weights: str
    weights_sha256: str
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    software_version: str = ""
    pixel_spacing: tuple[float, float] | None = None  # mm (row, column) it works at
    grain: Grain | None = None  # target-scanner noise added to the output (MR)
    cost: dict[str, Any] | None = None  # GFLOP per clinical slice (pipelines.cost), 2D
    styles: tuple[DomainStyle, ...] = ()  # a multi-domain model's domains, in generator order

    @property
    def dims(self) -> int:
        from pipelines.networks import spatial_dims
        return spatial_dims(self.params)

    @property
    def multidomain(self) -> bool:
        return bool(self.styles)

    @property
    def domains(self) -> str:
        """``source -> target`` by their names, for one-line listings; a multi-domain model
        converts any series to whichever of its domains a route names."""
        if self.styles:
            return f"any -> {' | '.join(d.name for d in self.styles)} (multi-domain)"
        return f"{_domain_name(self.source)} -> {_domain_name(self.target)}"

    def target_style(self, target_domain: str | None) -> DomainStyle | None:
        """The domain a series is converted to: None for a two-domain model (which must not
        be given one), the named domain of a multi-domain model (which must be)."""
        if not self.styles:
            if target_domain:
                raise ModelError(f"model '{self.name}' is not multi-domain: it converts"
                                 f" {self.domains} and takes no target domain"
                                 f" ('{target_domain}' given)")
            return None
        known = ", ".join(d.name for d in self.styles)
        if not target_domain:
            raise ModelError(f"model '{self.name}' is multi-domain: name the domain to convert"
                             f" to (target_domain; one of {known})")
        for domain in self.styles:
            if domain.name == target_domain:
                return domain
        raise ModelError(f"model '{self.name}' has no domain '{target_domain}' (known: {known})")

    @property
    def weights_path(self) -> Path:
        return self.path / self.weights


@dataclass(frozen=True)
class LoadedModel:
    """A verified model ready to run: its description and the generator in eval mode."""

    info: ModelInfo
    generator: nn.Module

    def translator(self, target_domain: str | None = None) -> tuple[nn.Module, DomainStyle | None]:
        """The module the runtime runs (one image in, one out) and the domain it converts
        to: the generator itself, or a multi-domain one fixed to ``target_domain``'s
        reference style. Raises :class:`ModelError` as :meth:`ModelInfo.target_style`."""
        domain = self.info.target_style(target_domain)
        if domain is None:
            return self.generator, None
        return self.generator.for_domain(self.info.styles.index(domain)), domain


def _domain_name(domain: Mapping[str, Any]) -> str:
    return str(domain.get("name") or ",".join(f"{k}={v}" for k, v in domain.items()) or "?")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model_folder(directory: str | os.PathLike[str], generator: nn.Module, *, name: str,
                      version: str, architecture: str, params: Mapping[str, Any],
                      source: Mapping[str, Any], target: Mapping[str, Any],
                      normalisation: Mapping[str, Any],
                      training: Mapping[str, Any] | None = None,
                      validation: Mapping[str, Any] | None = None,
                      software_version: str | None = None,
                      pixel_spacing: tuple[float, float] | None = None,
                      grain: Grain | None = None,
                      styles: Sequence[DomainStyle] = ()) -> Path:
    """Write ``directory/model.json`` and ``directory/weights.pt``; returns the folder.

    The generator must be rebuildable as ``build_generator(architecture, params)``, which is
    checked by loading its state_dict into a fresh instance before anything is written.
    ``pixel_spacing`` (mm, row then column) is the in-plane spacing the generator works at,
    where it is not every series' own (:mod:`pipelines.spacing`); ``grain`` the target
    scanner's noise the node adds to the output (:mod:`pipelines.grain`); ``styles`` a style
    generator's domains, in the order of (and equal to) its ``styles`` buffer. A 2D
    generator's ``cost`` (GFLOP per clinical-matrix slice, :mod:`pipelines.cost`) is counted
    here.
    """
    import torch

    from pipelines.networks import build_generator
    folder = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"model name {name!r} must be a plain folder name")
    norm = Normalisation.from_spec(normalisation)
    spacing = None if pixel_spacing is None else _spacing(list(pixel_spacing), "pixel_spacing")
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    _check_styles(architecture, params, styles, state.get("styles"), "generator")
    rebuilt = build_generator(architecture, dict(params))
    try:
        rebuilt.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"generator does not match architecture '{architecture}'"
                         f" with params {dict(params)}: {exc}") from None
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    atomic_write(weights, lambda fh: torch.save(state, fh))
    meta = {
        "format": FORMAT,
        "name": name,
        "version": str(version),
        "architecture": architecture,
        "params": dict(params),
        "source": dict(source),
        "target": dict(target),
        "normalisation": norm.to_spec(),
        **({"pixel_spacing": list(spacing)} if spacing else {}),
        **({"grain": grain.to_spec()} if grain else {}),
        **({"cost": cost} if (cost := _cost(rebuilt.eval(), source, params)) else {}),
        **({"domains": [d.to_spec() for d in styles]} if styles else {}),
        "training": dict(training or {}),
        "validation": dict(validation or {}),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "software_version": software_version or _software_version(),
        "weights": WEIGHTS_FILE,
        "weights_sha256": file_sha256(weights),
    }
    try:
        text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
    except TypeError as exc:
        raise ValueError(f"model.json must be JSON-serialisable: {exc}") from None
    atomic_write(folder / MODEL_JSON, lambda fh: fh.write(text.encode()))
    return folder


def _cost(generator: nn.Module, source: Mapping[str, Any],
          params: Mapping[str, Any]) -> dict[str, Any] | None:
    """model.json's ``cost`` of a 2D generator; None for 3D ones, and with a warning for one
    that cannot run a zero slice (the runtime will say why, on real series)."""
    from pipelines.cost import slice_cost
    from pipelines.networks import spatial_dims
    if spatial_dims(dict(params)) != 2:
        return None
    try:
        return slice_cost(generator, source.get("Modality"))
    except (RuntimeError, ValueError, TypeError) as exc:
        log.warning("model_cost_not_counted", reason=str(exc).splitlines()[0] if str(exc)
                    else type(exc).__name__)
        return None


def read_model_info(directory: str | os.PathLike[str]) -> ModelInfo:
    """Parse and validate ``model.json`` without touching the weights."""
    folder = Path(directory)
    where = folder / MODEL_JSON
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{where}: no model.json (not a model folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{where}: unreadable: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{where}: must hold a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ModelError(f"{where}: missing field '{missing[0]}'")
    for key in ("params", "source", "target", "training", "validation"):
        if not isinstance(meta.get(key, {}), dict):
            raise ModelError(f"{where}: '{key}' must be an object")
    weights = meta["weights"]
    if not isinstance(weights, str) or Path(weights).name != weights:
        raise ModelError(f"{where}: 'weights' must be a file name in the folder, got {weights!r}")
    try:
        norm = Normalisation.from_spec(meta["normalisation"])
    except ValueError as exc:
        raise ModelError(f"{where}: {exc}") from None
    try:
        spacing = _spacing(meta["pixel_spacing"], "'pixel_spacing'") \
            if meta.get("pixel_spacing") is not None else None
    except ValueError as exc:
        raise ModelError(f"{where}: {exc}") from None
    try:
        grain = Grain.from_spec(meta["grain"]) if meta.get("grain") is not None else None
        cost = _check_cost(meta["cost"]) if meta.get("cost") is not None else None
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{where}: {exc}") from None
    try:
        styles = _read_styles(meta)
    except ValueError as exc:
        raise ModelError(f"{where}: {exc}") from None
    return ModelInfo(path=folder, name=str(meta["name"]), version=str(meta["version"]),
                     architecture=str(meta["architecture"]), params=meta["params"],
                     source=meta["source"], target=meta["target"], normalisation=norm,
                     weights=weights, weights_sha256=str(meta["weights_sha256"]).lower(),
                     training=meta.get("training", {}), validation=meta.get("validation", {}),
                     created=str(meta.get("created", "")),
                     software_version=str(meta.get("software_version", "")),
                     pixel_spacing=spacing, grain=grain, cost=cost, styles=styles)


def _check_cost(value: Any) -> dict[str, Any]:
    """A ``cost`` as read from ``model.json``: ``ValueError`` unless it has a finite,
    non-negative ``gflop_per_slice`` and a ``slice`` of two positive integers."""
    if not isinstance(value, dict):
        raise ValueError(f"'cost' must be an object, got {value!r}")
    gflop_value, size = value.get("gflop_per_slice"), value.get("slice")
    if isinstance(gflop_value, bool) or not isinstance(gflop_value, int | float) or \
            not math.isfinite(gflop_value) or gflop_value < 0:
        raise ValueError(f"'cost.gflop_per_slice' must be a number >= 0, got {gflop_value!r}")
    if not isinstance(size, list) or len(size) != 2 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
        raise ValueError(f"'cost.slice' must be two positive integers, got {size!r}")
    return dict(value)


def _read_styles(meta: Mapping[str, Any]) -> tuple[DomainStyle, ...]:
    """model.json's ``domains``, checked against the architecture and its params."""
    raw = meta.get("domains", [])
    if not isinstance(raw, list):
        raise ValueError("'domains' must be a list of objects")
    style_dim = meta["params"].get("style_dim", 0)
    styles = tuple(DomainStyle.from_spec(d, int(style_dim)) for d in raw)
    names = [d.name for d in styles]
    if styles and (len(names) != meta["params"].get("domains")
                   or len(set(names)) != len(names)):
        raise ValueError(f"'domains' must name one domain per style the generator holds"
                         f" (params domains = {meta['params'].get('domains')}), each once;"
                         f" got {names}")
    return styles


def _check_styles(architecture: str, params: Mapping[str, Any], styles: Sequence[DomainStyle],
                  buffer: torch.Tensor | None, what: str) -> None:
    """A style generator lists one uniquely named domain per style it holds, with the values
    of its ``styles`` buffer; any other generator lists none."""
    import torch

    from pipelines.networks import is_styled
    if not is_styled(architecture):
        if styles:
            raise ValueError(f"'domains' given, but architecture '{architecture}' is not a style"
                             " generator")
        return
    names = [d.name for d in styles]
    if len(names) != params.get("domains") or len(set(names)) != len(names):
        raise ValueError(f"architecture '{architecture}' needs 'domains': one uniquely named"
                         f" domain per style (params domains = {params.get('domains')}), got"
                         f" {names}")
    if buffer is None or not torch.allclose(
            buffer.float(), torch.tensor([d.style for d in styles]), atol=1e-6):
        raise ValueError(f"the {what}'s styles differ from the domains' reference styles")


def _spacing(value: Any, what: str) -> tuple[float, float]:
    """Two positive finite millimetre values (row, column spacing)."""
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            and v > 0 for v in value):
        raise ValueError(f"{what} must be two positive numbers (mm, row then column),"
                         f" got {value!r}")
    return float(value[0]), float(value[1])


def load_model_folder(directory: str | os.PathLike[str]) -> LoadedModel:
    """Verify the weights' sha256, then build the generator and load them (CPU, eval mode)."""
    import torch

    from pipelines.networks import build_generator
    info = read_model_info(directory)
    weights = info.weights_path
    if not weights.is_file():
        raise ModelError(f"{weights}: weights file missing")
    actual = file_sha256(weights)
    if actual != info.weights_sha256:
        raise ModelError(f"{weights}: sha256 {actual[:12]}... does not match model.json"
                         f" ({info.weights_sha256[:12]}...); refusing to load")
    try:
        generator = build_generator(info.architecture, info.params)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        generator.load_state_dict(state)
    except (ValueError, RuntimeError, OSError, EOFError) as exc:
        raise ModelError(f"{info.path}: cannot load '{info.architecture}': {exc}") from None
    try:
        _check_styles(info.architecture, info.params, info.styles,
                      state.get("styles"), "weights file")
    except ValueError as exc:
        raise ModelError(f"{info.path}: {exc}") from None
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    return LoadedModel(info, generator)


def list_model_folders(models_dir: str | os.PathLike[str]) -> list[ModelInfo | ModelError]:
    """Every sub-folder of ``models_dir`` holding a model.json, by name; broken ones as errors."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    found: list[ModelInfo | ModelError] = []
    for folder in sorted(p for p in root.iterdir() if (p / MODEL_JSON).is_file()):
        try:
            found.append(read_model_info(folder))
        except ModelError as exc:
            found.append(exc)
    return found
