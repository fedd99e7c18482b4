"""Overlapping tiles and their blending weights, for seam-free patch-wise inference.

Each tile's weight is zero within ``margin`` pixels of every side that borders another tile
(never on a side at the image edge), then ramps linearly to 1 across the rest of the
overlap. With ``margin`` at least the generator's receptive radius, every pixel that counts
was computed from the same input as on the whole image, so tiled equals whole; that needs
``overlap >= 2 * margin + 1``. Tiles start on multiples of ``align`` (a U-Net's pooling grid);
the last tile runs to the image's end.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import numpy as np


def tile_starts(length: int, patch: int, overlap: int, align: int = 1) -> list[int]:
    """Starts of tiles of size ``min(patch, length)`` covering ``0..length``, overlapping by
    at least ``overlap``, on multiples of ``align``; the last tile (from the last start to
    ``length``) may be up to ``align - 1`` longer than ``patch``."""
    patch = min(patch, length)
    if patch <= 0:
        raise ValueError(f"patch must be positive, got {patch}")
    if patch == length:
        return [0]
    if not 0 <= overlap < patch:
        raise ValueError(f"overlap {overlap} must be below the patch size {patch}")
    stride = (patch - overlap) // align * align
    if stride <= 0:
        raise ValueError(f"patch {patch} less overlap {overlap} leaves no step that is a"
                         f" multiple of {align}")
    last = (length - patch) // align * align
    return [*range(0, last, stride), last]


def ramp(length: int, tile: slice, overlap: int, margin: int) -> np.ndarray:
    """1-D weight of ``tile`` on an axis of ``length``."""
    size = tile.stop - tile.start
    t = np.arange(size, dtype=np.float32)
    w = np.ones(size, dtype=np.float32)
    if overlap <= 0:
        return w
    width = max(overlap - 2 * margin, 1)
    if tile.start > 0:
        w = np.minimum(w, np.clip((t + 1 - margin) / width, 0.0, 1.0))
    if tile.stop < length:
        w = np.minimum(w, np.clip((size - t - margin) / width, 0.0, 1.0))
    return w


def tiles(shape: Sequence[int], patch: Sequence[int], overlap: int,
          align: int = 1) -> list[tuple[slice, ...]]:
    """Every tile of an N-D grid, as index slices."""
    axes = []
    for n, p in zip(shape, patch, strict=True):
        starts = tile_starts(n, p, overlap, align)
        ends = [s + min(p, n) for s in starts[:-1]] + [n]
        axes.append([slice(s, e) for s, e in zip(starts, ends, strict=True)])
    return [tuple(t) for t in product(*axes)]


def tile_weight(shape: Sequence[int], tile: Sequence[slice], overlap: int,
                margin: int) -> np.ndarray:
    """The N-D blending weight of one tile (outer product of its per-axis ramps)."""
    weight = np.ones((), dtype=np.float32)
    for n, s in zip(shape, tile, strict=True):
        weight = np.multiply.outer(weight, ramp(n, s, overlap, margin))
    return weight
