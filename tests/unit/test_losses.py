"""Losses: SSIM, adversarial (LSGAN, WGAN-GP), Gram texture, noise power spectrum, masked L1."""

from __future__ import annotations

import pytest
import torch

from pipelines.networks import SpectralFilter
from trainers.discriminators import PatchGAN
from trainers.domain_classifier import DomainClassifier
from trainers.losses import (
    AdversarialLoss,
    GramTextureLoss,
    SpectrumLoss,
    SSIMLoss,
    gradient_penalty,
    gram_matrix,
    lowpass,
    masked_l1,
    radial_power,
    ssim_map,
)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (1, 1, 12, 16, 16), (2, 1, 8, 8)])
def test_ssim_identity_and_noise(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.rand(shape)
    assert float(ssim_map(x, x).mean()) == pytest.approx(1.0, abs=1e-5)
    noisy = x + 0.3 * torch.randn(shape)
    assert float(ssim_map(x, noisy).mean()) < 0.8
    assert float(SSIMLoss()(x, x)) == pytest.approx(0.0, abs=1e-5)


def test_ssim_loss_shifts_zero_centred_data() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 24, 24) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    assert float(SSIMLoss(2.0, low=-1.0)(x, y)) == pytest.approx(
        float(SSIMLoss(2.0)(x + 1, y + 1)), abs=1e-6)


def test_lowpass_keeps_means_and_removes_grain() -> None:
    torch.manual_seed(0)
    noise = torch.randn(1, 1, 64, 64)
    assert lowpass(noise, 0.0) is noise
    smooth = lowpass(noise + 5.0, 1.5)
    assert smooth.shape == (1, 1, 54, 54)            # valid region of a 2*ceil(4.5)+1 window
    assert float(smooth.mean()) == pytest.approx(5.0, abs=0.1)
    assert float(smooth.std()) < 0.3 * float(noise.std())
    assert lowpass(torch.randn(1, 1, 8, 16, 16), 1.0).shape == (1, 1, 2, 10, 10)


def test_ssim_matches_skimage_convention() -> None:
    # constant images differing by an offset: luminance term only
    x, y = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.4)
    c1 = 0.01 ** 2
    expected = (2 * 0.2 * 0.4 + c1) / (0.2 ** 2 + 0.4 ** 2 + c1)
    assert float(ssim_map(x, y).mean()) == pytest.approx(expected, rel=1e-4)


def test_lsgan_and_wgan_losses() -> None:
    ones, zeros = torch.ones(4, 1), torch.zeros(4, 1)
    ls = AdversarialLoss("lsgan")
    assert float(ls.generator(ones)) == 0.0 and float(ls.discriminator(ones, zeros)) == 0.0
    w = AdversarialLoss("wgan-gp")
    assert float(w.discriminator(ones, zeros)) == -1.0 and float(w.generator(ones)) == -1.0
    with pytest.raises(ValueError):
        AdversarialLoss("hinge")


@pytest.mark.parametrize("dims", [2, 3])
def test_gradient_penalty_is_differentiable(dims: int) -> None:
    torch.manual_seed(0)
    critic = PatchGAN(features=4, layers=1, dims=dims)
    shape = (2, 1, 16, 16) if dims == 2 else (2, 1, 16, 16, 16)
    gp = gradient_penalty(critic, torch.randn(shape), torch.randn(shape))
    gp.backward()
    assert gp.item() >= 0 and critic.model[0].weight.grad is not None


def test_patchgan_output_is_a_map_of_patch_scores() -> None:
    d = PatchGAN(features=8, layers=3)
    assert d(torch.randn(1, 1, 128, 128)).shape == (1, 1, 14, 14)  # 70x70 receptive field


def test_gram_ignores_position_but_sees_texture() -> None:
    torch.manual_seed(0)
    net = DomainClassifier(features=4)
    loss = GramTextureLoss(net.features)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(4, 1, 36, 36), 5, 1)
    noisy = torch.randn(4, 1, 32, 32)
    rolled = torch.roll(smooth, shifts=(7, 11), dims=(2, 3))
    with torch.no_grad():
        same_texture = float(loss(smooth, rolled))
        other_texture = float(loss(smooth, noisy))
    assert same_texture < 0.1 * other_texture
    g = gram_matrix(torch.ones(2, 3, 4, 4))
    assert g.shape == (2, 3, 3) and torch.allclose(g, torch.ones(2, 3, 3))


def test_masked_l1() -> None:
    x, y = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    y[..., :2, :] = 5
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2:, :] = True
    assert float(masked_l1(x, y, mask)) == 1.0 and float(masked_l1(x, y)) == 3.0


def test_radial_power_sees_noise_texture() -> None:
    torch.manual_seed(0)
    white = torch.randn(8, 1, 48, 48)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(8, 1, 50, 50), 3, 1)
    p_white, p_smooth = radial_power(white), radial_power(smooth)
    assert p_white.shape == p_smooth.shape and p_white.numel() == 35  # rings 0..round(24*sqrt(2))
    assert p_smooth[-10:].mean() < 0.05 * p_white[-10:].mean()       # box blur: no grain
    ring = p_white[2:24]                                            # white: flat, unit power
    assert (ring - 1).abs().max() < 0.35 and abs(float(ring.mean()) - 1) < 0.1


def test_spectrum_loss_learns_the_filter_between_unpaired_textures() -> None:
    """Source: white noise; target: other white noise through a filter boosting high
    frequencies twofold. Unpaired batches, yet the output/input spectrum ratio pulls a
    spectral filter's gains to that filter's."""
    torch.manual_seed(0)
    boost = SpectralFilter(knots=4)
    with torch.no_grad():
        boost.log_gain.copy_(torch.log(torch.tensor([1.0, 2.0, 2.0])))
    g = SpectralFilter(knots=4)
    loss = SpectrumLoss()
    opt = torch.optim.Adam(g.parameters(), lr=0.05)
    for _ in range(150):
        a = torch.randn(4, 1, 48, 48)
        with torch.no_grad():
            b = boost(torch.randn(4, 1, 48, 48))
        loss.observe("a", a)
        loss.observe("b", b)
        value = loss(g(a), a, "a", "b")
        opt.zero_grad()
        value.backward()
        opt.step()
    learned = g.log_gain.exp().detach()
    assert torch.allclose(learned, torch.tensor([1.0, 2.0, 2.0]), rtol=0.15), learned
    state = loss.state()
    fresh = SpectrumLoss()
    fresh.load(state)
    with torch.no_grad():
        assert float(fresh(g(a), a, "a", "b")) == pytest.approx(float(loss(g(a), a, "a", "b")))
