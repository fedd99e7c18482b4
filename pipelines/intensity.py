"""Intensity normalisation between real values (HU, MR signal) and the network's [-1, 1].

A model folder's ``normalisation`` entry is one of:

* ``{"kind": "hu_window", "low": -1024, "high": 3071}``: CT; ``low..high`` HU map linearly to
  ``-1..1`` and values outside are clipped (``"clip": false`` keeps them).
* ``{"kind": "percentile", "low": 0.5, "high": 99.5}``: MR; the volume's own ``low``/``high``
  percentiles map to ``-1..1``, nothing is clipped unless ``"clip": true``.

The inverse uses the same anchors, so a harmonised volume lands in the source's units.
A clipping normalisation shows the network nothing beyond the window, so there the source
values pass through (:func:`keep_source`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("hu_window", "percentile")
EDGE = 1 / 512  # blend width inside each window end, as a fraction of the window (8 HU for CT)


@dataclass(frozen=True)
class Normalisation:
    kind: str
    low: float
    high: float
    clip: bool

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], where: str = "normalisation") -> Normalisation:
        """Validate a ``model.json`` normalisation entry; errors name the offending field."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where} must be an object, got {spec!r}")
        unknown = set(spec) - {"kind", "low", "high", "clip"}
        if unknown:
            raise ValueError(f"{where}: unknown field '{sorted(unknown)[0]}'"
                             " (known: kind, low, high, clip)")
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{where}.kind must be one of {list(KINDS)}, got {kind!r}")
        low, high = spec.get("low"), spec.get("high")
        for name, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{where}.{name} must be a number, got {value!r}")
        if not low < high:
            raise ValueError(f"{where}: low ({low}) must be below high ({high})")
        if kind == "percentile" and not 0 <= low < high <= 100:
            raise ValueError(f"{where}: percentiles must lie in 0..100, got {low}..{high}")
        clip = spec.get("clip", kind == "hu_window")
        if not isinstance(clip, bool):
            raise ValueError(f"{where}.clip must be true or false, got {clip!r}")
        return cls(kind, float(low), float(high), clip)

    def to_spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": self.low, "high": self.high, "clip": self.clip}

    def anchors(self, volume: np.ndarray) -> tuple[float, float]:
        """The real values that map to -1 and +1 for this volume."""
        if self.kind == "hu_window":
            return self.low, self.high
        lo, hi = np.percentile(volume, [self.low, self.high])
        if hi <= lo:  # a constant image: any positive width keeps it finite
            hi = lo + 1.0
        return float(lo), float(hi)


def normalise(volume: np.ndarray, norm: Normalisation) -> tuple[np.ndarray, tuple[float, float]]:
    """Map real values to the network range; returns the anchors for :func:`denormalise`."""
    lo, hi = norm.anchors(volume)
    out = volume.astype(np.float32)  # a copy; then in place: the same float32 operations,
    out -= lo                        # without a new 4-byte-per-voxel array for each
    out *= np.float32(2.0 / (hi - lo))
    out -= np.float32(1.0)
    if norm.clip:
        np.clip(out, -1.0, 1.0, out=out)
    return out, (lo, hi)


def denormalise(values: np.ndarray, anchors: tuple[float, float]) -> np.ndarray:
    """Inverse of :func:`normalise` (up to clipping)."""
    lo, hi = anchors
    out = values.astype(np.float32)  # a copy, then in place (as in normalise)
    out += np.float32(1.0)
    out *= np.float32((hi - lo) / 2.0)
    out += np.float32(lo)
    return out


def keep_source(source: np.ndarray, output: np.ndarray, anchors: tuple[float, float],
                norm: Normalisation, padding: np.ndarray | None = None) -> np.ndarray:
    """``output`` inside the window (ends included), ``source`` unchanged beyond it and
    wherever ``padding``.

    A clipped value (air below -1024 HU, padding, metal above 3071 HU) reached the network as
    the window's end and would come back as the output there. Over :data:`EDGE` of the
    window's width just beyond each end the two blend linearly, so the result stays a
    continuous function of the source value. The ends themselves belong to the model: -1024
    HU is where scanners clip noisy lung and air, well inside what the model has learnt.
    Without clipping only ``padding`` passes through. Updates ``output`` in place and
    returns it.
    """
    if norm.clip:
        lo, hi = anchors
        inside = np.minimum(source - np.float32(lo), np.float32(hi) - source)
        inside *= np.float32(1.0 / ((hi - lo) * EDGE))
        inside += np.float32(1.0)
        np.clip(inside, 0.0, 1.0, out=inside)
    else:
        inside = np.ones(source.shape, np.float32)
    if padding is not None:
        inside[padding] = 0.0
    output -= source
    output *= inside
    output += source
    return output
