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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from pipelines import software_version as _software_version
from pipelines.cost import check_cost, slice_cost
from pipelines.errors import ModelError
from pipelines.files import atomic_write
from pipelines.grain import Grain
from pipelines.intensity import Normalisation
from pipelines.networks import build_generator, spatial_dims

log = structlog.get_logger(component="model_folder")

MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.pt"
FORMAT = 1
_REQUIRED = ("name", "version", "architecture", "params", "source", "target",
             "normalisation", "weights", "weights_sha256")


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

    @property
    def dims(self) -> int:
        return spatial_dims(self.params)

    @property
    def domains(self) -> str:
        """``source -> target`` by their names, for one-line listings."""
        return f"{_domain_name(self.source)} -> {_domain_name(self.target)}"

    @property
    def weights_path(self) -> Path:
        return self.path / self.weights


@dataclass(frozen=True)
class LoadedModel:
    """A verified model ready to run: its description and the generator in eval mode."""

    info: ModelInfo
    generator: nn.Module


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
                      grain: Grain | None = None) -> Path:
    """Write ``directory/model.json`` and ``directory/weights.pt``; returns the folder.

    The generator must be rebuildable as ``build_generator(architecture, params)``, which is
    checked by loading its state_dict into a fresh instance before anything is written.
    ``pixel_spacing`` (mm, row then column) is the in-plane spacing the generator works at,
    where it is not every series' own (:mod:`pipelines.spacing`); ``grain`` the target
    scanner's noise the node adds to the output (:mod:`pipelines.grain`). A 2D generator's
    ``cost`` (GFLOP per clinical-matrix slice, :mod:`pipelines.cost`) is counted here.
    """
    folder = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"model name {name!r} must be a plain folder name")
    norm = Normalisation.from_spec(normalisation)
    spacing = None if pixel_spacing is None else _spacing(list(pixel_spacing), "pixel_spacing")
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
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
        cost = check_cost(meta["cost"]) if meta.get("cost") is not None else None
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{where}: {exc}") from None
    return ModelInfo(path=folder, name=str(meta["name"]), version=str(meta["version"]),
                     architecture=str(meta["architecture"]), params=meta["params"],
                     source=meta["source"], target=meta["target"], normalisation=norm,
                     weights=weights, weights_sha256=str(meta["weights_sha256"]).lower(),
                     training=meta.get("training", {}), validation=meta.get("validation", {}),
                     created=str(meta.get("created", "")),
                     software_version=str(meta.get("software_version", "")),
                     pixel_spacing=spacing, grain=grain, cost=cost)


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
