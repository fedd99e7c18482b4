"""Inference runtime: tiles blend without seams, batching is invisible, failures are clear."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pipelines import inference
from pipelines.errors import InferenceError
from pipelines.inference import (
    CPU_TILE,
    Execution,
    InferenceSettings,
    autocast_dtype,
    choose_execution,
    plan_tiles,
    run_generator,
)
from pipelines.intensity import Normalisation, denormalise, keep_source, normalise
from pipelines.tiling import tile_starts, tiles
from tests.model_factory import Smoother, random_generator

FP32 = dict(bf16=False, device="cpu")


@pytest.fixture
def volume():
    return np.random.default_rng(0).uniform(-1, 1, (4, 40, 52)).astype(np.float32)


def test_tiles_cover_every_pixel_with_the_requested_overlap():
    assert tile_starts(64, 32, 16) == [0, 16, 32]
    assert tile_starts(70, 32, 16) == [0, 16, 32, 38]
    assert tile_starts(20, 32, 8) == [0]
    covered = np.zeros((40, 52), int)
    for t in tiles((40, 52), (16, 16), 8):
        covered[t] += 1
    assert covered.min() >= 1


@pytest.mark.parametrize("dims", [2, 3])
def test_tiled_equals_whole_image(volume, dims):
    model = Smoother(dims=dims, layers=2)
    whole = run_generator(model, volume, dims, InferenceSettings(**FP32))
    tiled = run_generator(model, volume, dims,
                          InferenceSettings(patch_size=16, patch_overlap=8, batch_size=3, **FP32))
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    assert not np.allclose(whole, volume)  # the generator did something


def test_batch_size_does_not_change_the_result(volume):
    model = Smoother(layers=2)
    a = run_generator(model, volume, 2, InferenceSettings(batch_size=1, **FP32))
    b = run_generator(model, volume, 2, InferenceSettings(batch_size=64, **FP32))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_autocast_stays_close_to_fp32(volume):
    if autocast_dtype(torch.device("cpu"), True) is None:
        pytest.skip("CPU has no native bf16")
    model = Smoother(layers=2)
    fp32 = run_generator(model, volume, 2, InferenceSettings(**FP32))
    bf16 = run_generator(model, volume, 2, InferenceSettings(device="cpu", bf16=True))
    np.testing.assert_allclose(bf16, fp32, atol=2e-2)


def timings(monkeypatch, faster: str):
    """A CPU with native bf16 on which the execution ``faster`` wins the timed runs; records
    the executions timed."""
    calls = []
    def seconds(generator, sample, dims, settings, execution):
        calls.append(str(execution))
        return 1.0 if str(execution) == faster else 2.0
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(inference, "_seconds", seconds)
    return calls


def test_execution_without_a_cache_is_decided_by_hardware_and_settings(volume, monkeypatch):
    calls = timings(monkeypatch, "fp32")
    cpu = InferenceSettings(device="cpu")
    assert choose_execution(Smoother(), volume, 2, cpu, key="abc") == Execution("bf16")
    assert choose_execution(Smoother(), volume, 2, InferenceSettings(**FP32)) == Execution()
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert choose_execution(Smoother(), volume, 2, cpu) == Execution("fp32")
    assert calls == []  # nothing timed


def test_timed_execution_is_kept_per_model_and_machine(volume, monkeypatch, tmp_path):
    """A re-run (after a crash, in another process) must not time again and flip."""
    cache, cpu = tmp_path / "state" / "execution.json", InferenceSettings(device="cpu")
    calls = timings(monkeypatch, "fp32")
    assert choose_execution(Smoother(), volume, 2, cpu, key="sha-a", cache=cache) == \
        Execution("fp32")
    assert calls == ["bf16", "fp32"]   # slices smaller than a CPU tile: no tiles to time
    timings(monkeypatch, "bf16")  # the machine is busier now: timings say otherwise
    assert choose_execution(Smoother(), volume, 2, cpu, key="sha-a", cache=cache) == \
        Execution("fp32")
    assert choose_execution(Smoother(), volume, 2, cpu, key="sha-b", cache=cache) == \
        Execution("bf16")
    assert sorted(json.loads(cache.read_text()).values()) == ["bf16", "fp32"]
    cache.write_text("{damaged")
    with pytest.raises(InferenceError, match="execution cache .*delete the file"):
        choose_execution(Smoother(), volume, 2, cpu, key="sha-a", cache=cache)


def test_cpu_tiles_are_timed_for_large_slices_of_exact_generators(monkeypatch, tmp_path):
    """A 512 x 512 slice through a plain CNN may run faster in cache-sized tiles; CBAM
    (global pooling, tiles not exact) and a configured patch_size are never re-tiled."""
    big = np.random.default_rng(0).normal(0, 0.3, (2, 512, 512)).astype(np.float32)
    cpu, cache = InferenceSettings(device="cpu"), tmp_path / "execution.json"
    calls = timings(monkeypatch, f"bf16 tile {CPU_TILE}")
    plain = random_generator("plain", features=4, blocks=2)
    chosen = choose_execution(plain, big, 2, cpu, key="plain", cache=cache)
    assert chosen == Execution("bf16", CPU_TILE)
    assert calls == ["bf16", f"bf16 tile {CPU_TILE}", "fp32", f"fp32 tile {CPU_TILE}"]
    calls.clear()
    cbam = random_generator("plain", features=4, blocks=3, cbam=1)
    assert choose_execution(cbam, big, 2, cpu, key="cbam", cache=cache) == Execution("bf16")
    assert calls == ["bf16", "fp32"]
    calls.clear()
    patched = InferenceSettings(device="cpu", patch_size=256)
    choose_execution(plain, big, 2, patched, key="patched", cache=cache)
    assert calls == ["bf16", "fp32"]
    # the tiled execution is seam-free: it equals whole slices up to float rounding
    whole = run_generator(plain, big, 2, InferenceSettings(**FP32), execution=Execution())
    tiled = run_generator(plain, big, 2, InferenceSettings(**FP32),
                          execution=Execution("fp32", CPU_TILE))
    np.testing.assert_allclose(tiled, whole, atol=1e-4)


def test_execution_text_round_trips():
    for text in ("fp32", "bf16", f"bf16 tile {CPU_TILE}"):
        assert str(Execution.parse(text)) == text
    for bad in ("int8", "bf16 tile", "bf16 tile -3", "bf16 slice 2"):
        with pytest.raises(ValueError):
            Execution.parse(bad)


class Broken(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x):
        if self.mode == "raise":
            raise RuntimeError("kernel exploded\ntraceback noise")
        if self.mode == "shape":
            return x[..., 1:]
        return x * float("nan")


@pytest.mark.parametrize("mode, message", [
    ("raise", "m1: failed on cpu: kernel exploded"),
    ("shape", "m1: output shape"),
    ("nan", "m1: produced NaN"),
])
def test_failing_generator_raises_a_clear_error(volume, mode, message):
    with pytest.raises(InferenceError) as info:
        run_generator(Broken(mode), volume, 2, InferenceSettings(**FP32), name="m1")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cuda_requested_without_cuda_is_an_error(volume):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(InferenceError, match="no CUDA device"):
        run_generator(Smoother(), volume, 2, InferenceSettings(device="cuda"))


def test_normalisation_round_trips():
    real = np.linspace(-1500, 3500, 101, dtype=np.float32)
    ct = Normalisation.from_spec({"kind": "hu_window", "low": -1024, "high": 3071})
    norm, anchors = normalise(real, ct)
    assert norm.min() == -1 and norm.max() == 1
    inside = (real >= -1024) & (real <= 3071)
    np.testing.assert_allclose(denormalise(norm, anchors)[inside], real[inside], atol=1e-3)
    mr = Normalisation.from_spec({"kind": "percentile", "low": 1, "high": 99})
    norm, anchors = normalise(real, mr)
    np.testing.assert_allclose(denormalise(norm, anchors), real, atol=1e-3)
    assert norm.max() > 1  # not clipped


def test_keep_source_passes_values_beyond_a_clipping_window_through():
    ct = Normalisation.from_spec({"kind": "hu_window", "low": -1024, "high": 3071})
    source = np.array([-3000, -1032, -1028, -1024, -1016, 0, 3071, 3079, 5000], np.float32)
    output = np.full(source.shape, 7.0, np.float32)  # what a network might say anywhere
    kept = keep_source(source, output.copy(), (-1024.0, 3071.0), ct)
    np.testing.assert_array_equal(kept[[0, 1, 7, 8]], source[[0, 1, 7, 8]])  # 8 HU beyond
    np.testing.assert_array_equal(kept[[3, 4, 5, 6]], 7.0)  # the window, ends included
    assert kept[2] == pytest.approx(0.5 * -1028 + 0.5 * 7.0, abs=0.2)  # half-way out
    padding = np.zeros(source.shape, bool)
    padding[5] = True
    assert keep_source(source, output.copy(), (-1024.0, 3071.0), ct, padding)[5] == 0.0
    mr = Normalisation.from_spec({"kind": "percentile", "low": 1, "high": 99})
    np.testing.assert_array_equal(keep_source(source, output.copy(), (0.0, 1.0), mr), output)


@pytest.mark.parametrize("architecture, params, patch", [
    ("plain", {"features": 8, "blocks": 8}, 48),        # the shipped CT kernel model's depth
    ("unet", {"features": 4, "levels": 1}, 64),
    ("unet", {"features": 4, "levels": 2}, 64),         # tiles raised to 132, overlap 66
    ("shuffle-unet", {"features": 4, "levels": 1}, 64),  # radius 26 px, on 2 x 2 blocks
])
def test_real_generators_tile_without_seams(architecture, params, patch):
    """Tiled equals whole up to float rounding (1e-4 of the [-1, 1] range, ~0.2 HU) with the
    configured overlap (32) raised to what the receptive field needs, tiles on the U-Net's
    pooling grid and a last tile that is not."""
    volume = np.random.default_rng(1).uniform(-1, 1, (2, 260, 202)).astype(np.float32)
    net = random_generator(architecture, **params)
    whole = run_generator(net, volume, 2, InferenceSettings(**FP32))
    tiled = run_generator(net, volume, 2, InferenceSettings(patch_size=patch, batch_size=3,
                                                            **FP32))
    assert len(plan_tiles(net, volume, 2, InferenceSettings(patch_size=patch)).grid) > 4
    np.testing.assert_allclose(tiled, whole, atol=1e-4)
    assert np.abs(whole - volume).mean() > 1e-2  # the generator did something


def test_overlap_and_patch_are_raised_to_the_receptive_field():
    net = random_generator("unet", features=4, levels=2)  # radius 32, pooling grid 4
    volume = np.zeros((1, 300, 300), np.float32)
    plan = plan_tiles(net, volume, 2, InferenceSettings(patch_size=64, patch_overlap=32))
    assert (plan.patch, plan.overlap, plan.margin, plan.exact) == (132, 66, 32, True)
    assert all(t.start % 4 == 0 for tile in plan.grid for t in tile)
    cbam = random_generator("plain", features=8, blocks=6, cbam=1)
    assert not plan_tiles(cbam, volume, 2, InferenceSettings(patch_size=64)).exact


def test_cbam_tiles_only_come_close(volume):
    """Channel attention pools each tile, not the image: no overlap makes tiles identical."""
    volume = np.random.default_rng(2).uniform(-1, 1, (1, 160, 160)).astype(np.float32)
    net = random_generator("plain", features=8, blocks=6, cbam=1)
    whole = run_generator(net, volume, 2, InferenceSettings(**FP32))
    tiled = run_generator(net, volume, 2, InferenceSettings(patch_size=64, **FP32))
    assert 0 < np.abs(tiled - whole).max() < 0.05
