"""Generator registry: every architecture keeps shape, starts as the identity, runs 2D and
(where it can) 3D."""

from __future__ import annotations

import pytest
import torch

from pipelines.cost import gflop
from pipelines.networks import (
    CBAM,
    GENERATORS,
    PlainResidualCNN,
    ResidualUNet,
    ShuffleUNet,
    SpectralFilter,
    build_generator,
    count_parameters,
    fft_size,
    spatial_dims,
)

CASES = [
    ("plain", {"features": 8, "blocks": 4}),
    ("plain", {"features": 8, "blocks": 5, "cbam": 2}),
    ("unet", {"features": 4, "levels": 2}),
    ("unet", {"features": 4, "levels": 3, "cbam": True}),
    ("spectral", {"knots": 8}),
    ("shuffle-unet", {"features": 4, "levels": 2}),
]
TWO_D_ONLY = {"shuffle-unet"}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(("arch", "params"), CASES)
def test_shape_preserved_and_identity_at_init(arch: str, params: dict, dims: int) -> None:
    torch.manual_seed(0)
    if dims == 3 and arch in TWO_D_ONLY:
        with pytest.raises(ValueError, match="2D"):
            build_generator(arch, {**params, "dims": dims})
        return
    g = build_generator(arch, {**params, "dims": dims})
    shape = (2, 1, 21, 19) if dims == 2 else (1, 1, 7, 13, 11)  # sizes not divisible by 8
    x = torch.randn(shape)
    y = g(x)
    assert y.shape == x.shape
    assert torch.allclose(y, x, atol=1e-6)  # zero-initialised residual, or unit gains


@pytest.mark.parametrize(("arch", "params"), CASES)
def test_learns_after_one_step(arch: str, params: dict) -> None:
    torch.manual_seed(0)
    g = build_generator(arch, params)
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    x = torch.randn(2, 1, 16, 16)
    for _ in range(2):
        loss = (g(x) - 2 * x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(g(x), x)


def test_registry_and_errors() -> None:
    assert GENERATORS["plain"] is PlainResidualCNN and GENERATORS["unet"] is ResidualUNet
    with pytest.raises(ValueError, match="known: plain"):
        build_generator("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        build_generator("plain", {"colour": 3})
    with pytest.raises(ValueError, match="cbam"):
        build_generator("plain", {"blocks": 4, "cbam": 3})
    assert spatial_dims({"dims": 3}) == 3 and spatial_dims(None) == 2


def test_unet_never_uses_transposed_convolutions() -> None:
    g = ResidualUNet(features=4)
    assert not any(isinstance(m, nn_t) for m in g.modules()
                   for nn_t in (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d))


def test_plain_defaults_follow_chaimeleon() -> None:
    g = PlainResidualCNN()
    convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 12 and convs[1].out_channels == 64
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in g.modules())
    assert count_parameters(g) < 400_000


def test_cbam_reweights_features() -> None:
    torch.manual_seed(0)
    block = CBAM(8, dims=2)
    x = torch.randn(2, 8, 10, 10)
    y = block(x)
    assert y.shape == x.shape and (y.abs() <= x.abs() + 1e-6).all()  # sigmoid gates <= 1


def test_spectral_filter_is_the_fft_filter_its_gains_describe() -> None:
    """A filter of gain 1 at frequency 0 rising to 3 at the corner, against the same filter
    applied by hand; the mean (HU of water and air) is kept, and it acts per slice."""
    g = SpectralFilter(knots=5)
    with torch.no_grad():
        g.log_gain.copy_(torch.log(torch.tensor([1.5, 2.0, 2.5, 3.0])))
    torch.manual_seed(0)
    x = torch.randn(3, 1, 40, 40) + 5.0
    # the reach (6 pixels) on each side, the right and bottom grown to 54 = 2 x 3^3 for the FFT
    assert g.padding(40, 40) == (6, 8, 6, 8)
    pad = g.reach
    padded = torch.nn.functional.pad(x, (6, 8, 6, 8), mode="reflect")
    fy = torch.fft.fftfreq(padded.shape[-2])[:, None]
    fx = torch.fft.rfftfreq(padded.shape[-1])[None, :]
    f = torch.sqrt(fx**2 + fy**2) / 0.5**0.5 * 4          # position among the 5 knots
    gains = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0])
    low = f.floor().long().clamp(max=3)
    curve = gains[low] * (1 - (f - low)) + gains[low + 1] * (f - low)
    expected = torch.fft.irfft2(torch.fft.rfft2(padded) * curve, s=padded.shape[-2:])
    expected = expected[..., pad:pad + 40, pad:pad + 40]
    assert torch.allclose(g(x), expected, atol=1e-5)
    with torch.no_grad():
        assert abs(float(g(x).mean() - x.mean())) < 0.05 * float(x.std())
    volume = torch.randn(1, 1, 4, 24, 24)
    assert torch.allclose(g(volume)[0, 0, 2], g(volume[:, :, 2])[0, 0], atol=1e-5)
    assert g.gain(torch.zeros(1)).item() == 1.0
    with pytest.raises(ValueError, match="knots"):
        SpectralFilter(knots=1)


def test_spectral_filter_keeps_its_transfer_function_only_while_its_gains_stay() -> None:
    """Inference computes the gains on the FFT grid once per slice size; new gains (a
    training step, loaded weights) are seen at once."""
    g = SpectralFilter(knots=4)
    x = torch.randn(2, 1, 30, 30)
    with torch.no_grad():
        before = g(x)
        g.log_gain.fill_(0.5)
        after = g(x)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        g.log_gain.zero_()
        assert torch.allclose(g(x), before) and torch.allclose(before, x, atol=1e-5)


def test_fft_size_is_the_next_5_smooth_length() -> None:
    assert [fft_size(n) for n in (1, 7, 512, 556, 577, 601)] == [1, 8, 512, 576, 600, 625]


def test_shuffle_unet_works_on_pixel_blocks() -> None:
    """A quarter of the U-Net's FLOPs at the same width, twice its reach in pixels; every
    pixel keeps its own output (no block is averaged); 2D only."""
    torch.manual_seed(0)
    g, unet = ShuffleUNet(features=8, levels=2), ResidualUNet(features=8, levels=2)
    for p in g.parameters():
        torch.nn.init.normal_(p, std=0.1)
    field, unet_field = g.receptive_field(), unet.receptive_field()
    assert field.align == 8 and field.radius == 2 * (unet_field.radius + 1)
    assert 0.2 < gflop(g, 64, 64) / gflop(unet, 64, 64) < 0.3
    x = torch.randn(1, 1, 160, 160)
    with torch.no_grad():
        y = g(x)
        residual = y - x
        assert (residual[..., 0::2, 0::2] != residual[..., 1::2, 1::2]).all()
        probe = x.clone()
        probe[..., 80, 80] += 1.0  # one pixel changes outputs within the reach only
        changed = (g(probe) - y).abs()[0, 0] > 0
    assert changed[80, 81] and not changed[80, 80 + field.radius + 1:].any()
    with pytest.raises(ValueError, match="2D"):
        ShuffleUNet(dims=3)
