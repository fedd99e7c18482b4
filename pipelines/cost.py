"""What a generator costs per slice, as ``model.json`` records it (``cost``).

Counted by running the generator once on a zero slice under torch's ``FlopCounterMode``:
convolutions and matrix products at 2 operations per multiply-add, and FFTs, which torch
does not count, at the usual 2.5 N log2 N for a real transform of N points (Cooley-Tukey's
5 N log2 N for a complex one, halved). Element-wise work (activations, padding, pooling,
the spectral filter's gains) is left out: it is memory-bound and small beside those.
The figure is per slice of the modality's clinical matrix on the grid the model works on
(:data:`COST_SLICE`: CT 512², MR 256²), so models compare at the size they are run at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

COST_SLICE = {"CT": 512, "MR": 256}
_ANY_SLICE = 512  # a modality without a clinical matrix here


def _real_fft(points: int, batch: int) -> int:
    return int(2.5 * points * math.log2(points) * batch) if points > 1 else 0


def _r2c(shape: Sequence[int], dim: Sequence[int], *_: Any, **__: Any) -> int:
    points = math.prod(shape[d] for d in dim)
    return _real_fft(points, math.prod(shape) // points)


def _c2r(shape: Sequence[int], dim: Sequence[int], _normalization: int, last_dim_size: int,
         **__: Any) -> int:
    points = math.prod(shape[d] for d in dim[:-1]) * last_dim_size
    return _real_fft(points, math.prod(shape) // math.prod(shape[d] for d in dim))


_FFT = {torch.ops.aten._fft_r2c: _r2c, torch.ops.aten._fft_c2r: _c2r}


def gflop(generator: nn.Module, rows: int, cols: int) -> float:
    """GFLOP of one (1, 1, rows, cols) slice through ``generator`` (2D generators)."""
    with FlopCounterMode(display=False, custom_mapping=_FFT) as counter, \
            torch.inference_mode():
        generator(torch.zeros(1, 1, rows, cols))
    return counter.get_total_flops() / 1e9


def slice_cost(generator: nn.Module, modality: str | None) -> dict[str, Any]:
    """``model.json``'s ``cost``: GFLOP per clinical-matrix slice, 4 significant digits."""
    size = COST_SLICE.get(str(modality or "").upper(), _ANY_SLICE)
    return {"gflop_per_slice": float(f"{gflop(generator, size, size):.4g}"),
            "slice": [size, size]}
