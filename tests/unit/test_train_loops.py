"""Training loops on in-memory phantoms: they learn, validate, resume and honour budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from trainers.data import PatchSampler, body_mask, match_slices
from trainers.domain_classifier import balanced_accuracy, train_classifier
from trainers.loop import fit, select_device
from trainers.options import PairedOptions, UnpairedOptions
from trainers.paired import PairedData, paired_step
from trainers.unpaired import ImagePool, UnpairedData, unpaired_step

CPU = torch.device("cpu")


def phantom(seed: int, slices: int = 4, size: int = 48) -> tuple[np.ndarray, ...]:
    """A body with blobs: a 'sharp' noisy version and a 'smooth' one, in [-1, 1] units."""
    rng = np.random.default_rng(seed)
    _, yy, xx = np.mgrid[:slices, :size, :size]
    c = size / 2
    body = ((yy - c) / (0.42 * size)) ** 2 + ((xx - c) / (0.33 * size)) ** 2 < 1
    img = np.where(body, 0.0, -0.9)
    for _ in range(6):
        cy, cx, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [rng.integers(2, 6)]
        img = img + 0.3 * rng.standard_normal() * (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2)
    img = img * body + -0.9 * ~body
    smooth = ndimage.gaussian_filter(img, (0, 1, 1))
    sharp = img + 0.05 * rng.standard_normal(img.shape) * body
    return sharp.astype(np.float32), smooth.astype(np.float32), body


@pytest.fixture(scope="module")
def phantoms() -> list[tuple[np.ndarray, ...]]:
    return [phantom(s) for s in range(4)]


def paired_data(ph: list) -> PairedData:
    return PairedData([p[0] for p in ph[:3]], [p[1] for p in ph[:3]], [p[2] for p in ph[:3]],
                      [ph[3][0]], [ph[3][1]], [ph[3][2]])


def unpaired_data(ph: list) -> UnpairedData:
    return UnpairedData([p[0] for p in ph[:2]], [p[2] for p in ph[:2]],
                        [p[1] for p in ph[2:3]], [p[2] for p in ph[2:3]],
                        [ph[3][0]], [ph[3][2]], [ph[3][1]], [ph[3][2]])


def test_body_mask_fills_holes_and_drops_specks() -> None:
    vol = np.full((3, 40, 40), -1000.0)
    vol[:, 5:35, 5:35] = 40
    vol[:, 15:20, 15:20] = -950  # lung: inside the body
    vol[:, 0, 0] = 100  # speck outside
    mask = body_mask(vol, "CT")
    assert mask[:, 17, 17].all() and not mask[:, 0, 0].any() and mask.sum() == 3 * 30 * 30


def test_match_slices_by_position() -> None:
    assert match_slices([0.0, 1.0, 2.0], [2.0, 0.0, 5.0]) == [(0, 1), (2, 0)]


def test_patch_sampler_stays_in_body_and_pairs(phantoms: list) -> None:
    sharp, smooth, body = phantoms[0]
    s = PatchSampler([sharp], [body], 8, 2, seed=1, partners=[smooth], flip=False)
    x, y = s.sample(32)
    assert x.shape == y.shape == (32, 1, 8, 8)
    assert (x[:, 0, 4, 4] > -0.85).float().mean() > 0.9  # centres lie inside the body
    assert torch.allclose(torch.from_numpy(ndimage.gaussian_filter(sharp, (0, 1, 1))).mean(),
                          torch.from_numpy(smooth).mean(), atol=0.05)
    with pytest.raises(ValueError, match="exceeds"):
        PatchSampler([sharp], [body], 64)


def test_paired_training_improves_validation(tmp_path: Path, phantoms: list) -> None:
    options = PairedOptions(name="p", patch=32, batch=8, steps=60, val_every=30, lr=3e-3,
                            progress=False, workdir=tmp_path, param={"features": 16,
                                                                     "blocks": 5})
    torch.manual_seed(0)
    result = fit(paired_step(paired_data(phantoms), options, CPU), options)
    start = result.history["val_psnr"][0][1]
    assert result.best["psnr"] > start + 1.5  # dB over the untrained identity
    assert result.best_step in (30, 60) and result.steps == 60
    assert set(result.generator_state) and (tmp_path / "checkpoint.pt").is_file()


def test_resume_continues_where_it_stopped(tmp_path: Path, phantoms: list) -> None:
    data = paired_data(phantoms)
    base = dict(name="p", patch=16, batch=4, val_every=5, progress=False, workdir=tmp_path,
                param={"features": 4, "blocks": 3}, seed=3)
    torch.manual_seed(0)
    fit(paired_step(data, PairedOptions(steps=10, **base), CPU), PairedOptions(steps=10, **base))
    opts = PairedOptions(steps=15, resume=True, **base)
    result = fit(paired_step(data, opts, CPU), opts)
    assert result.steps == 15 and [s for s, _ in result.history["l1"]] == list(range(1, 16))


def test_minutes_budget_stops_cleanly(tmp_path: Path, phantoms: list) -> None:
    opts = PairedOptions(name="p", patch=16, batch=4, steps=10_000, minutes=0.02,
                         val_every=10_000, progress=False, workdir=tmp_path,
                         param={"features": 4, "blocks": 3})
    result = fit(paired_step(paired_data(phantoms), opts, CPU), opts)
    assert result.stopped == "minutes" and 0 < result.steps < 10_000
    assert result.history["val_psnr"][-1][0] == result.steps  # validated at the stop


@pytest.mark.parametrize("gan", ["lsgan", "wgan-gp"])
def test_unpaired_cyclegan_runs_with_every_option(tmp_path: Path, phantoms: list,
                                                  gan: str) -> None:
    data = unpaired_data(phantoms)
    torch.manual_seed(0)
    features = train_classifier(list(data.samplers(32, 2, 0)), steps=20, batch=8, features=4)
    opts = UnpairedOptions(name="u", patch=32, batch=2, steps=4, val_every=2, progress=False,
                           workdir=tmp_path, gan=gan, ssim=1.0, gram=1.0, spectrum=1.0, pool=2,
                           cycle_sigma=1.0 if gan == "wgan-gp" else 0.0,
                           disc_features=4, disc_layers=2, param={"features": 4, "levels": 2,
                                                                   "cbam": True})
    result = fit(unpaired_step(data, opts, features, CPU), opts)
    first = result.history["val_domain_distance"][0][1]
    assert first == pytest.approx(3.0)  # identity: relative w1, Gram and spectrum are 1 each
    for key in ("g_adv", "cycle", "identity", "ssim_loss", "gram", "spectrum", "d"):
        assert len(result.history[key]) == 4 and np.isfinite(result.history[key]).all()


def test_unpaired_spectral_resumes_with_its_spectra(tmp_path: Path, phantoms: list) -> None:
    """The spectral generator under the noise-power-spectrum loss; the domains' mean
    spectra accumulated so far are part of the checkpoint, as the image pools are."""
    data = unpaired_data(phantoms)
    features = train_classifier(list(data.samplers(32, 2, 0)), steps=2, batch=4, features=2)
    base = dict(name="u", architecture="spectral", param={"knots": 6}, patch=32, batch=2,
                val_every=3, progress=False, workdir=tmp_path, spectrum=10.0, gram=0.0,
                disc_features=2, disc_layers=1, pool=0, lr=1e-2)
    torch.manual_seed(0)
    first = UnpairedOptions(steps=3, **base)
    fit(unpaired_step(data, first, features, CPU), first)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["extra"]["spectrum"]["counts"] == {"a": 3, "b": 3}
    again = UnpairedOptions(steps=5, resume=True, **base)
    result = fit(unpaired_step(data, again, features, CPU), again)
    assert result.steps == 5 and [s for s, _ in result.history["spectrum"]] == [1, 2, 3, 4, 5]
    assert set(result.generator_state) == {"log_gain"}


def test_unpaired_3d(tmp_path: Path) -> None:
    data = unpaired_data([phantom(s, slices=16, size=32) for s in range(4)])
    features = train_classifier(list(data.samplers(16, 3, 0)), steps=2, batch=4, features=2)
    opts = UnpairedOptions(name="u", dims=3, patch=16, batch=1, steps=2, val_every=2,
                           progress=False, workdir=tmp_path, disc_features=2, disc_layers=1,
                           pool=0, gram=1.0, param={"features": 2, "levels": 1})
    result = fit(unpaired_step(data, opts, features, CPU), opts)
    assert result.steps == 2


def test_domain_classifier_separates_textures(phantoms: list) -> None:
    data = unpaired_data(phantoms)
    torch.manual_seed(0)
    samplers = list(data.samplers(24, 2, 0))
    model = train_classifier(samplers, steps=150, batch=16, features=8)
    sharp = PatchSampler(data.val_source, data.val_source_masks, 24, 2, 5).sample(32)[0]
    smooth = PatchSampler(data.val_target, data.val_target_masks, 24, 2, 6).sample(32)[0]
    assert balanced_accuracy(model, [sharp, smooth]) > 0.8
    assert balanced_accuracy(model, [smooth, smooth]) == pytest.approx(0.5, abs=0.2)


def test_image_pool_mixes_history() -> None:
    pool = ImagePool(4, seed=0)
    first = pool.query(torch.zeros(4, 1, 2, 2))
    assert torch.equal(first, torch.zeros(4, 1, 2, 2))
    later = pool.query(torch.ones(16, 1, 2, 2))
    assert 0 < int((later == 0).all(dim=(1, 2, 3)).sum()) < 16
    assert torch.equal(ImagePool(0).query(torch.ones(2, 1)), torch.ones(2, 1))


def test_select_device() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda")
