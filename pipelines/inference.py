"""Running a generator over a normalised volume: device, precision, batching and tiling.

2D generators see slices (N, 1, H, W), whole or in ``patch_size`` tiles; 3D generators see
(N, 1, D, H, W) patches (``patch_size`` 0 = the whole volume at once). ``batch_size`` tiles
go through per forward pass, which bounds memory. Overlapping tiles are blended with
:mod:`pipelines.tiling` weights, so there are no seams. CPU runs under bf16 autocast when the
CPU has native bf16 (AVX512-BF16 or AMX), CUDA under AMP (bf16, or fp16 where bf16 is
missing); ``bf16 = false`` keeps everything in fp32.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from pipelines.errors import InferenceError
from pipelines.settings import InferenceSettings
from pipelines.tiling import tile_weight, tiles


def resolve_device(setting: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise InferenceError("[inference] device = 'cuda' but no CUDA device is available")
    if setting not in ("cpu", "cuda"):
        raise InferenceError(f"[inference] device must be auto, cpu or cuda, got {setting!r}")
    return torch.device(setting)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (otherwise bf16 autocast is slower than fp32)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(device: torch.device, bf16: bool) -> torch.dtype | None:
    """The reduced precision to autocast to on ``device``, or None for fp32."""
    if not bf16:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def _precision(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


_FASTER: weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.dtype | None]] = \
    weakref.WeakKeyDictionary()


def faster_precision(generator: nn.Module, x: torch.Tensor, device: torch.device,
                     dtype: torch.dtype) -> torch.dtype | None:
    """``dtype`` if autocasting to it runs this generator faster than fp32 here, else None.

    CPU bf16 speed depends on the operators: oneDNN convolutions gain, but e.g. reflection
    padding in bf16 can lose more than they gain. One timed pass of each, remembered per
    generator and input shape, picks the faster precision instead of assuming it.
    """
    key = (device.type, dtype, tuple(x.shape))
    known = _FASTER.setdefault(generator, {})
    if key not in known:
        seconds = {}
        with torch.inference_mode():
            for candidate in (None, dtype):
                with _precision(device, candidate):
                    generator(x)  # warm-up: kernel selection, allocations
                    start = time.perf_counter()
                    generator(x)
                    seconds[candidate] = time.perf_counter() - start
        known[key] = dtype if seconds[dtype] < seconds[None] else None
    return known[key]


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + size]


def run_generator(generator: nn.Module, volume: np.ndarray, dims: int,
                  settings: InferenceSettings | None = None, *,
                  name: str = "generator") -> np.ndarray:
    """Apply ``generator`` to a normalised (slices, rows, cols) volume; same shape, float32.

    Raises :class:`InferenceError` (with ``name`` in the message) for anything the generator
    does wrong: an exception, a wrong output shape, non-finite values, running out of memory.
    """
    if volume.ndim != 3:
        raise InferenceError(f"expected a (slices, rows, cols) volume, got shape {volume.shape}")
    if dims not in (2, 3):
        raise InferenceError(f"{name}: dims must be 2 or 3, got {dims}")
    settings = settings or InferenceSettings()
    device = resolve_device(settings.device)
    dtype = autocast_dtype(device, settings.bf16)
    if settings.threads > 0 and device.type == "cpu":
        torch.set_num_threads(settings.threads)
    # Channels-last lets oneDNN / cuDNN pick their fastest convolution kernels.
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    generator.to(device=device, memory_format=layout if dims == 2 else torch.preserve_format)
    shape = volume.shape if dims == 3 else volume.shape[1:]
    size = settings.patch_size or max(shape)
    grid = tiles(shape, [size] * len(shape), settings.patch_overlap)
    # 2D: every (slice, tile) pair is one network input; 3D: every patch is one.
    jobs = [(s, k) for s in range(volume.shape[0]) for k in range(len(grid))] if dims == 2 \
        else [(None, k) for k in range(len(grid))]
    blend = len(grid) > 1
    out = np.zeros(volume.shape, dtype=np.float32)
    weight_sum = np.zeros(volume.shape, dtype=np.float32) if blend else None
    weights = [tile_weight(shape, t, settings.patch_overlap) for t in grid] if blend else []
    try:
        with torch.inference_mode():
            for batch in _batches(jobs, settings.batch_size):
                index = [(s, *grid[k]) if s is not None else grid[k] for s, k in batch]
                x = torch.from_numpy(np.stack([volume[i] for i in index])[:, None])
                x = x.to(device).contiguous(memory_format=layout)
                if dtype is not None and device.type == "cpu":
                    dtype = faster_precision(generator, x[:1], device, dtype)
                with _precision(device, dtype):
                    y = generator(x)
                if y.shape != x.shape:
                    raise InferenceError(f"{name}: output shape {tuple(y.shape)} differs from"
                                         f" input {tuple(x.shape)}")
                result = y[:, 0].float().cpu().numpy()
                if not np.isfinite(result).all():
                    raise InferenceError(f"{name}: produced NaN or infinite values")
                for (_, k), i, r in zip(batch, index, result, strict=True):
                    if blend:
                        out[i] += r * weights[k]
                        weight_sum[i] += weights[k]
                    else:
                        out[i] = r
    except InferenceError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise InferenceError(f"{name}: out of GPU memory; lower [inference] batch_size or"
                             " set patch_size") from None
    except (RuntimeError, ValueError, TypeError, MemoryError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InferenceError(f"{name}: failed on {device.type}: {first}") from exc
    if blend:
        out /= np.maximum(weight_sum, np.float32(1e-12))
    return out
