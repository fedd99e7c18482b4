"""Resampling to a model's pixel spacing: the pure functions, the model folder field, and
the node's harmonisation running on the model's grid and writing on the series' own."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydicom import dcmread

from pipelines.derived import PRIVATE_CREATOR, PRIVATE_GROUP
from pipelines.errors import ModelError
from pipelines.harmonise import ModelCache, harmonise_series
from pipelines.inference import InferenceSettings
from pipelines.model_folder import MODEL_JSON, read_model_info
from pipelines.series import load_series
from pipelines.spacing import resample_volume, resize_slices, working_shape
from tests.dicom_factory import write_series
from tests.model_factory import make_model

FAST = InferenceSettings(device="cpu", bf16=False)


def test_working_shape_keeps_the_field_of_view():
    assert working_shape((128, 128), (1.875, 1.875), (0.9375, 0.9375)) == (256, 256)
    assert working_shape((100, 90), (1.0, 0.5), (2.0, 2.0)) == (50, 22)
    assert working_shape((64, 48), (1.0, 1.0), None) == (64, 48)


def test_fourier_resize_up_and_back_is_the_identity_and_keeps_the_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 30, 41)).astype(np.float32)
    up = resize_slices(x, (77, 64))
    assert up.shape == (3, 77, 64) and up.dtype == np.float32
    np.testing.assert_allclose(up.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(resize_slices(up, (30, 41)), x, atol=1e-5)
    assert resize_slices(x, (30, 41)) is x


def test_fourier_resize_down_keeps_what_the_coarse_grid_can_hold():
    """A cosine the coarser grid resolves comes through at full amplitude: no spatial
    kernel's blur near its Nyquist frequency. Sample j of m lies where sample j * n / m
    of n did (the first pixel stays put)."""
    n, m, k = 64, 32, 12  # k cycles per field of view, below m/2
    fine = np.cos(2 * np.pi * k * np.arange(n) / n)
    coarse = np.cos(2 * np.pi * k * np.arange(m) / m)
    out = resize_slices(np.tile(fine, (1, n, 1)).astype(np.float32), (n, m))
    np.testing.assert_allclose(out[0, 0], coarse, atol=1e-4)


def test_resampled_volume_has_matching_geometry(tmp_path):
    volume = load_series(write_series(tmp_path / "s", slices=2, size=32, pixel_spacing=0.8))
    half = resample_volume(volume, (0.4, 0.4))
    assert half.array.shape == (2, 64, 64) and half.spacing == (volume.spacing[0], 0.4, 0.4)
    np.testing.assert_array_equal(half.origin, volume.origin)
    assert resample_volume(volume, (0.8, 0.8)) is volume


def test_model_folder_records_and_validates_pixel_spacing(tmp_path):
    folder = make_model(tmp_path, "m", pixel_spacing=(0.5, 0.5))
    assert read_model_info(folder).pixel_spacing == (0.5, 0.5)
    assert read_model_info(make_model(tmp_path, "plain")).pixel_spacing is None
    assert "pixel_spacing" not in json.loads((tmp_path / "plain" / MODEL_JSON).read_text())
    meta = json.loads((folder / MODEL_JSON).read_text())
    for bad in ([0.5], [0.5, -1], "0.5", [0.5, float("nan")]):
        (folder / MODEL_JSON).write_text(json.dumps({**meta, "pixel_spacing": bad}))
        with pytest.raises(ModelError, match="'pixel_spacing' must be two positive numbers"):
            read_model_info(folder)
    with pytest.raises(ValueError, match="pixel_spacing must be two positive numbers"):
        make_model(tmp_path, "zero", pixel_spacing=(0.0, 1.0))


def _harmonise(tmp_path, files, model):
    outcome = harmonise_series(files, routes=[], models_dir=tmp_path / "models",
                               out_dir=tmp_path / "out" / model, model_name=model,
                               options=FAST, cache=ModelCache())
    assert outcome.status == "harmonised", outcome.reason
    block = dcmread(outcome.outputs[0]).private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    return load_series(outcome.outputs), json.loads(block[0x14].value)["inference"]


def test_the_node_runs_a_model_on_its_grid_and_writes_on_the_series_own(tmp_path):
    files = write_series(tmp_path / "in", modality="MR", slices=3, size=32, pixel_spacing=1.6)
    source = load_series(files)
    make_model(tmp_path / "models", "identity", modality="MR", mix=0.0, pixel_spacing=(0.8, 0.8))
    make_model(tmp_path / "models", "fine", modality="MR", pixel_spacing=(0.8, 0.8))
    make_model(tmp_path / "models", "native", modality="MR")
    make_model(tmp_path / "models", "same", modality="MR", pixel_spacing=(1.6, 1.6))

    out, inference = _harmonise(tmp_path, files, "identity")
    assert inference["resampled_to"] == [64, 64]
    assert out.array.shape == source.array.shape and out.spacing == source.spacing
    np.testing.assert_allclose(out.array, source.array, atol=0.6)  # stored integers
    # a smoothing model acts on the finer grid: each of its 3x3 means spans half the
    # distance it does on the series' own pixels
    fine, _ = _harmonise(tmp_path, files, "fine")
    native, native_inference = _harmonise(tmp_path, files, "native")
    def roughness(a):
        return float(np.abs(np.diff(a, axis=2)).mean())
    assert roughness(native.array) < roughness(fine.array) < roughness(source.array)
    same, same_inference = _harmonise(tmp_path, files, "same")
    assert "resampled_to" not in native_inference and "resampled_to" not in same_inference
    np.testing.assert_array_equal(same.array, native.array)
