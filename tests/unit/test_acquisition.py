"""The fitted MR acquisition (trainers.acquisition) and the node's grain (pipelines.grain)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from pipelines.errors import ModelError
from pipelines.grain import Grain, add_grain, kspace_window, receiver_noise
from pipelines.model_folder import read_model_info
from tests.model_factory import make_model
from trainers.acquisition import Acquisition, background_noise, fit_acquisition

SIZE = 64


def _anatomy(rng: np.random.Generator, slices: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A 'brain' of three smooth tissue classes at 1.0, 0.5 and 0.15 inside a disc of air."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE / 2
    body = np.broadcast_to(xx ** 2 + yy ** 2 < (SIZE * 0.4) ** 2, (slices, SIZE, SIZE))
    field = ndimage.gaussian_filter(rng.standard_normal((slices, SIZE, SIZE)), (0, 3, 3))
    tissue = np.digitize(field, np.quantile(field, [0.35, 0.7]))
    image = np.choose(tissue, [0.15, 0.5, 1.0]) * body
    return ndimage.gaussian_filter(image, (0, 0.7, 0.7)).astype(np.float32), body.copy()


def test_the_fit_recovers_a_known_acquisition() -> None:
    """Target images, and source images of other anatomy acquired by a known model: the
    fit finds its noise, window taper and contrast from the two sets' statistics alone."""
    rng = np.random.default_rng(0)
    truth = Acquisition(knots=(-0.2, 0.0, 0.15, 0.5, 1.0, 1.3),
                        values=(-0.1, 0.0, 0.45, 0.8, 1.0, 1.1),
                        sigma=0.03, edge=0.75, apodisation=0.3)
    targets, target_masks, sources, source_masks = [], [], [], []
    for _ in range(4):
        image, body = _anatomy(rng)
        targets.append(image + np.abs(0.01 * rng.standard_normal(image.shape)))
        target_masks.append(body)
        image, body = _anatomy(rng)
        sources.append(truth.synthesise(image, rng))
        source_masks.append(body)
    fitted = fit_acquisition(targets, target_masks, sources, source_masks, edge=0.75,
                             steps=300, log=lambda _: None)
    assert fitted.edge == 0.75
    assert fitted.sigma == pytest.approx(0.03, rel=0.25)
    assert fitted.apodisation == pytest.approx(0.3, abs=0.15)
    # the contrast at the three tissues (relative to the 99.5th percentile: about 1.0)
    for tissue in (0.15, 0.5, 1.0):
        assert np.interp(tissue, fitted.knots, fitted.values) == pytest.approx(
            np.interp(tissue, truth.knots, truth.values), abs=0.08)
    spec = fitted.to_spec()
    assert json.loads(json.dumps(spec))["edge"] == 0.75 and len(spec["knots"]) == 33


def test_the_fit_wants_one_square_matrix() -> None:
    a, m = _anatomy(np.random.default_rng(1))
    with pytest.raises(ValueError, match="one square matrix"):
        fit_acquisition([a], [m], [a[:, :, :32]], [m[:, :, :32]], edge=1.0, steps=1)
    with pytest.raises(ValueError, match="edge"):
        fit_acquisition([a], [m], [a], [m], edge=0.0, steps=1)


def test_background_noise_is_measured_in_the_air() -> None:
    rng = np.random.default_rng(2)
    image, body = _anatomy(rng)
    noisy = np.abs(image + receiver_noise(image.shape, 0.04, 1.0, 0.0, rng)).astype(np.float32)
    assert background_noise([noisy], [body]) == pytest.approx(0.04, rel=0.1)
    with pytest.raises(ValueError, match="no background"):
        background_noise([noisy], [np.ones_like(body)])


def test_receiver_noise_has_the_asked_spread_and_band() -> None:
    rng = np.random.default_rng(3)
    noise = receiver_noise((8, SIZE, SIZE), 0.05, 0.5, 0.2, rng)
    assert noise.real.std() == pytest.approx(0.05, rel=0.05)
    power = np.abs(np.fft.fft2(noise)) ** 2
    beyond = np.abs(np.fft.fftfreq(SIZE)) * 2 > 0.5
    assert power[:, beyond, :].max() < 1e-12 * power.max()  # nothing past the edge
    window = kspace_window(SIZE, 0.5, 0.2)
    assert window[0] == 1.0 and window[beyond].max() == 0.0
    assert ((window > 0) & (window < 1)).any()                # the taper inside the band


def test_grain_is_reproducible_rician_and_of_the_asked_level() -> None:
    flat = np.full((4, SIZE, SIZE), 100.0, np.float32)
    flat[:, :8] = 0.0                                  # air
    grain = Grain(sigma=0.05, edge=1.0, apodisation=0.0, fraction=0.4)
    out = add_grain(flat, grain)
    assert np.array_equal(out, add_grain(flat.copy(), grain))     # seeded by the input
    assert not np.array_equal(out, add_grain(flat + 1, grain) - 1)
    assert out.dtype == flat.dtype and (out >= 0).all()
    assert (out[:, 8:] - 100).std() == pytest.approx(100 * 0.05 * 0.4, rel=0.1)
    assert out[:, :8].mean() > 0                       # Rician: the air gets a floor
    assert add_grain(flat, Grain(0.05, 1.0, 0.0, 0.0)) is flat


def test_grain_specs_are_validated_in_model_json(tmp_path) -> None:
    assert Grain.from_spec(Grain(0.02, 1.0, 0.1, 0.2).to_spec()) == Grain(0.02, 1.0, 0.1, 0.2)
    with pytest.raises(ValueError, match="fraction must be a number in"):
        Grain(0.02, 1.0, 0.1, 1.5)
    with pytest.raises(ValueError, match="unknown keys"):
        Grain.from_spec({"sigma": 0.02, "edge": 1, "apodisation": 0, "fraction": 0, "x": 1})
    folder = make_model(tmp_path, "m", modality="MR", grain=Grain(0.02, 1.0, 0.1, 0.2))
    assert read_model_info(folder).grain == Grain(0.02, 1.0, 0.1, 0.2)
    meta = json.loads((folder / "model.json").read_text())
    meta["grain"]["edge"] = 2.0
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="grain edge must be a number in"):
        read_model_info(folder)
