"""Losses: SSIM, adversarial (LSGAN, WGAN-GP), Gram texture, masked L1."""

from __future__ import annotations

import pytest
import torch

from trainers.discriminators import PatchGAN
from trainers.domain_classifier import DomainClassifier
from trainers.losses import (
    AdversarialLoss,
    GramTextureLoss,
    SSIMLoss,
    gradient_penalty,
    gram_matrix,
    lowpass,
    masked_l1,
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
