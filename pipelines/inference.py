"""Running a generator over a normalised volume: device, precision, batching and tiling.

2D generators see slices (N, 1, H, W), whole or in ``patch_size`` tiles; 3D generators see
(N, 1, D, H, W) patches (``patch_size`` 0 = the whole volume at once). ``batch_size`` tiles
go through per forward pass, which bounds memory. Overlapping tiles are blended with
:mod:`pipelines.tiling` weights over a margin of the generator's receptive radius
(:func:`plan_tiles` raises a too small overlap or patch), so there are no seams: tiled equals
whole up to float rounding, except for generators with global pooling (CBAM), whose tiles
each see their own statistics and can only come close.

How a model runs (its :class:`Execution`: precision, and on the CPU whether 2D slices go
through whole or in cache-sized tiles) is deterministic for a given model on a given machine,
because a re-run of a job must write the same bytes under the same derived UIDs. Without a
cache file: CUDA runs under AMP (bf16, or fp16 where bf16 is missing), a CPU with native bf16
(AVX512-BF16 or AMX) under bf16 autocast, anything else (or ``bf16 = false``) in fp32, slices
whole. Given a cache file, :func:`choose_execution` times the candidates once per model,
machine and slice size on the CPU and keeps the fastest: a 512 x 512 slice through a 32
channel CNN makes every layer's activations tens of MB, far beyond the CPU's caches, while
192 px tiles stay near its L2 and run about three times faster, blending included.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from pipelines.errors import InferenceError
from pipelines.files import atomic_write
from pipelines.networks import ReceptiveField, receptive_field
from pipelines.settings import InferenceSettings
from pipelines.tiling import tile_weight, tiles

log = structlog.get_logger(component="inference")

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def precision_name(dtype: torch.dtype | None) -> str:
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def _prepare(generator: nn.Module, dims: int, settings: InferenceSettings) -> tuple[
        torch.device, torch.memory_format]:
    """Device, threads and memory layout, the same for timing and for the real run."""
    device = resolve_device(settings.device)
    if settings.threads > 0 and device.type == "cpu":
        torch.set_num_threads(settings.threads)
    # Channels-last lets oneDNN / cuDNN pick their fastest convolution kernels.
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    generator.to(device=device, memory_format=layout if dims == 2 else torch.preserve_format)
    return device, layout


@dataclass(frozen=True)
class Plan:
    """How a volume is cut: ``shape`` is what the generator tiles (a slice, or the volume)."""

    shape: tuple[int, ...]
    grid: list[tuple[slice, ...]]
    patch: int = 0  # 0: one tile, no blending
    overlap: int = 0
    margin: int = 0  # zero-weight border of each tile (the receptive radius)
    exact: bool = True


def seamless_overlap(settings: InferenceSettings, field: ReceptiveField) -> int:
    """The configured overlap, raised to what ``field`` needs for tiles without seams: a
    zero-weight margin of the receptive radius on both sides, and a ramp between."""
    return max(settings.patch_overlap, 2 * field.radius + 2)


def plan_tiles(generator: nn.Module, volume: np.ndarray, dims: int,
               settings: InferenceSettings, name: str = "generator") -> Plan:
    """The tiles for ``settings.patch_size``, made seam-free for this generator.

    The overlap is raised to ``2 * radius + 2`` of the generator's receptive field, the
    patch, where its step would fall below the overlap, to twice the overlap (on the
    pooling grid): a smaller patch bounds memory, but not at the price of seams.
    """
    shape = tuple(volume.shape if dims == 3 else volume.shape[1:])
    if not settings.patch_size or settings.patch_size >= max(shape):
        return Plan(shape, [tuple(slice(0, n) for n in shape)])
    field = receptive_field(generator)
    if field is None:
        raise InferenceError(f"{name}: {type(generator).__name__} declares no receptive field,"
                             " so it cannot be tiled without seams; set [inference]"
                             " patch_size = 0")
    overlap = seamless_overlap(settings, field)
    patch = settings.patch_size
    if patch - overlap < overlap:
        patch = -(-2 * overlap // field.align) * field.align
    grid = tiles(shape, [patch] * len(shape), overlap, field.align)
    return Plan(shape, grid, patch, overlap, field.radius, field.exact)


# Edge of the tiles a 2D generator may see on the CPU (see the module doc): 32 channels of
# 192 x 192 bf16 activations are 2.4 MB. Only ever used where timing shows it faster.
CPU_TILE = 192
# Bumped when the candidates change, so cached decisions made without them are made again.
EXECUTION_CACHE_VERSION = 2


@dataclass(frozen=True)
class Execution:
    """How a generator runs: ``precision`` (fp32 | bf16 | fp16) and ``tile``, the edge of the
    tiles (one per forward pass) 2D slices are cut into on the CPU; 0 = as ``[inference]``
    says (whole slices unless ``patch_size`` is set)."""

    precision: str = "fp32"
    tile: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r} (known: {list(PRECISIONS)})")
        if self.tile < 0:
            raise ValueError(f"tile must be 0 or positive, got {self.tile}")

    def __str__(self) -> str:
        return self.precision + (f" tile {self.tile}" if self.tile else "")

    @classmethod
    def parse(cls, text: str) -> Execution:
        """The inverse of ``str()``: ``"bf16"`` or ``"bf16 tile 192"``."""
        parts = str(text).split()
        if len(parts) == 1:
            return cls(parts[0])
        if len(parts) == 3 and parts[1] == "tile" and parts[2].isdigit():
            return cls(parts[0], int(parts[2]))
        raise ValueError(f"not an execution: {text!r}")

    def settings(self, settings: InferenceSettings, dims: int) -> InferenceSettings:
        """``settings`` with this execution's tiling applied (2D, no patch_size set)."""
        if self.tile and dims == 2 and not settings.patch_size:
            return replace(settings, patch_size=self.tile, batch_size=1)
        return settings


def _seconds(generator: nn.Module, sample: np.ndarray, dims: int,
             settings: InferenceSettings, execution: Execution) -> float:
    """One timed run of ``sample`` after a warm-up run (kernel selection, allocations)."""
    run_generator(generator, sample, dims, settings, execution=execution)
    start = time.perf_counter()
    run_generator(generator, sample, dims, settings, execution=execution)
    return time.perf_counter() - start


def _candidates(generator: nn.Module, volume: np.ndarray, dims: int,
                settings: InferenceSettings, dtype: torch.dtype | None) -> list[Execution]:
    """What is worth timing: each precision, whole slices and, for a 2D generator with an
    exact receptive field small enough for :data:`CPU_TILE`, tiles of it."""
    precisions = list(dict.fromkeys([precision_name(dtype), "fp32"]))
    tile_sizes = [0]
    field = receptive_field(generator)
    if dims == 2 and not settings.patch_size and field is not None and field.exact \
            and 2 * seamless_overlap(settings, field) <= CPU_TILE \
            and max(volume.shape[1:]) > CPU_TILE:
        tile_sizes.append(CPU_TILE)
    return [Execution(p, t) for p in precisions for t in tile_sizes]


def choose_execution(generator: nn.Module, volume: np.ndarray, dims: int,
                     settings: InferenceSettings | None = None, *, key: str | None = None,
                     cache: Path | None = None) -> Execution:
    """The :class:`Execution` :func:`run_generator` should use for this model and volume.

    Without ``cache`` (or ``key``), decided by hardware and settings alone (see the module
    doc). With both, on the CPU: oneDNN convolutions gain from bf16 but e.g. reflection
    padding can lose more than they gain, and cache-sized tiles can beat whole slices, so
    one timed run of each candidate on a batch of slices (2D) or the volume (3D) decides, and the
    answer is stored in ``cache`` (JSON, under ``key`` = the model's weights sha256, the
    slice size, this CPU's capability and the torch version): every later run of that model
    on this machine uses it, whatever the timings would say then.
    """
    settings = settings or InferenceSettings()
    device = resolve_device(settings.device)
    dtype = autocast_dtype(device, settings.bf16)
    if device.type != "cpu" or key is None or cache is None:
        return Execution(precision_name(dtype))
    # 2D: a full batch of slices, as whole slices go through batch_size at a time
    sample = volume[:max(2, settings.batch_size)] if dims == 2 else volume
    size = "x".join(map(str, sample.shape[-2:] if dims == 2 else sample.shape))
    entry = (f"{key} {size} cpu {torch.backends.cpu.get_cpu_capability()}"
             f" torch {torch.__version__} v{EXECUTION_CACHE_VERSION}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.with_name(cache.name + ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one decision even with concurrent runs
            known = json.loads(cache.read_text(encoding="utf-8")) if cache.exists() else {}
            if not isinstance(known, dict):
                raise ValueError("not a JSON object")
            if entry not in known:
                candidates = _candidates(generator, volume, dims, settings, dtype)
                if len(candidates) > 1:
                    timed = {c: _seconds(generator, sample, dims, settings, c)
                             for c in candidates}
                    best = min(candidates, key=timed.__getitem__)
                    log.info("execution_chosen", model=key, slice=size, execution=str(best),
                             seconds={str(c): round(t, 4) for c, t in timed.items()})
                else:
                    best = candidates[0]
                known[entry] = str(best)
                text = json.dumps(known, indent=1, sort_keys=True).encode()
                atomic_write(cache, lambda fh: fh.write(text))
            return Execution.parse(known[entry])
    except (OSError, ValueError) as exc:  # unwritable folder, a damaged JSON file
        raise InferenceError(f"execution cache {cache}: {exc} (delete the file to time"
                             " the models again)") from exc


def _batches(items: list, size: int, key: Callable[[Any], Any]) -> Iterator[list]:
    """Runs of up to ``size`` items of one ``key`` (tiles of one shape, which stack)."""
    for _, group in groupby(sorted(items, key=key), key):
        run = list(group)
        for i in range(0, len(run), max(1, size)):
            yield run[i:i + size]


def run_generator(generator: nn.Module, volume: np.ndarray, dims: int,
                  settings: InferenceSettings | None = None, *, name: str = "generator",
                  execution: Execution | None = None) -> np.ndarray:
    """Apply ``generator`` to a normalised (slices, rows, cols) volume; same shape, float32.

    ``execution`` comes from :func:`choose_execution` (None: its hardware-only answer).
    Raises :class:`InferenceError` (with ``name`` in the message) for anything the generator
    does wrong: an exception, a wrong output shape, non-finite values, running out of memory.
    """
    if volume.ndim != 3:
        raise InferenceError(f"expected a (slices, rows, cols) volume, got shape {volume.shape}")
    if dims not in (2, 3):
        raise InferenceError(f"{name}: dims must be 2 or 3, got {dims}")
    settings = settings or InferenceSettings()
    device, layout = _prepare(generator, dims, settings)
    execution = execution or choose_execution(generator, volume, dims, settings)
    dtype = PRECISIONS[execution.precision]
    configured = settings
    settings = execution.settings(settings, dims)
    plan = plan_tiles(generator, volume, dims, settings, name)
    if plan.patch and configured.patch_size and \
            (plan.patch, plan.overlap) != (settings.patch_size, settings.patch_overlap):
        log.warning("tiling_raised", model=name, patch_size=plan.patch, overlap=plan.overlap,
                    configured=[settings.patch_size, settings.patch_overlap],
                    reason=f"receptive radius {plan.margin} px")
    if plan.patch and not plan.exact:
        log.info("tiling_approximate", model=name,
                 reason="global pooling (CBAM) sees each tile, not the whole image")
    shape, grid = plan.shape, plan.grid
    # 2D: every (slice, tile) pair is one network input; 3D: every patch is one.
    jobs = [(s, k) for s in range(volume.shape[0]) for k in range(len(grid))] if dims == 2 \
        else [(None, k) for k in range(len(grid))]
    blend = len(grid) > 1
    out = np.zeros(volume.shape, dtype=np.float32)
    weight_sum = np.zeros(volume.shape, dtype=np.float32) if blend else None
    weights = [tile_weight(shape, t, plan.overlap, plan.margin) for t in grid] if blend else []

    def collect(batch: list, index: list, result: torch.Tensor,
                copied: torch.cuda.Event | None) -> None:
        """Check one batch's output and put it in place (blending tiles)."""
        if copied is not None:
            copied.synchronize()
        values = result.numpy()
        if not np.isfinite(values).all():
            raise InferenceError(f"{name}: produced NaN or infinite values")
        for (_, k), i, r in zip(batch, index, values, strict=True):
            if blend:
                out[i] += r * weights[k]
                weight_sum[i] += weights[k]
            else:
                out[i] = r

    try:
        with torch.inference_mode():
            # On CUDA the batch's input goes up from pinned memory and its output comes down
            # into pinned memory without blocking, and the previous batch is checked and
            # blended while this one runs, so the GPU waits neither for copies nor for us.
            pending: tuple | None = None
            for batch in _batches(jobs, settings.batch_size,
                                  lambda job: [t.stop - t.start for t in grid[job[1]]]):
                index = [(s, *grid[k]) if s is not None else grid[k] for s, k in batch]
                x = torch.from_numpy(np.stack([volume[i] for i in index])[:, None])
                if device.type == "cuda":
                    x = x.pin_memory()
                x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
                with _precision(device, dtype):
                    y = generator(x)
                if y.shape != x.shape:
                    raise InferenceError(f"{name}: output shape {tuple(y.shape)} differs from"
                                         f" input {tuple(x.shape)}")
                result, copied = y[:, 0].float(), None
                if device.type == "cuda":
                    host = torch.empty(result.shape, dtype=torch.float32, pin_memory=True)
                    result = host.copy_(result, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record()
                if pending is not None:
                    collect(*pending)
                pending = (batch, index, result, copied)
            if pending is not None:
                collect(*pending)
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
