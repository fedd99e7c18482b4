"""Overlapping tiles and their blending weights, for seam-free patch-wise inference.

Each tile's weight ramps from 0 to 1 across the overlap on every side that borders another
tile (never on a side at the image edge). The outer quarter of the overlap has zero weight,
so a generator whose receptive radius is at most ``overlap / 4`` gives the same result tiled
as on the whole image: the pixels a tile's own border padding disturbs never count.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import numpy as np


def tile_starts(length: int, patch: int, overlap: int) -> list[int]:
    """Starts of tiles of size ``min(patch, length)`` covering ``0..length``, overlapping
    by at least ``overlap`` (the last tile is pulled back to end at ``length``)."""
    patch = min(patch, length)
    if patch <= 0:
        raise ValueError(f"patch must be positive, got {patch}")
    if patch == length:
        return [0]
    if not 0 <= overlap < patch:
        raise ValueError(f"overlap {overlap} must be below the patch size {patch}")
    stride = patch - overlap
    starts = list(range(0, length - patch, stride))
    return [*starts, length - patch]


def ramp(length: int, start: int, patch: int, overlap: int) -> np.ndarray:
    """1-D weight of the tile ``start..start+patch`` on an axis of ``length``."""
    t = np.arange(patch, dtype=np.float32)
    w = np.ones(patch, dtype=np.float32)
    if overlap <= 0:
        return w
    dead, width = overlap / 4.0, overlap / 2.0
    if start > 0:
        w = np.minimum(w, np.clip((t + 0.5 - dead) / width, 0.0, 1.0))
    if start + patch < length:
        w = np.minimum(w, np.clip((patch - t - 0.5 - dead) / width, 0.0, 1.0))
    return w


def tiles(shape: Sequence[int], patch: Sequence[int], overlap: int) -> list[tuple[slice, ...]]:
    """Every tile of an N-D grid, as index slices."""
    axes = [[slice(s, s + min(p, n)) for s in tile_starts(n, p, overlap)]
            for n, p in zip(shape, patch, strict=True)]
    return [tuple(t) for t in product(*axes)]


def tile_weight(shape: Sequence[int], tile: Sequence[slice], overlap: int) -> np.ndarray:
    """The N-D blending weight of one tile (outer product of its per-axis ramps)."""
    weight = np.ones((), dtype=np.float32)
    for n, s in zip(shape, tile, strict=True):
        axis = ramp(n, s.start, s.stop - s.start, overlap)
        weight = np.multiply.outer(weight, axis)
    return weight
