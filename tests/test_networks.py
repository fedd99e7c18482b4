"""Generator registry: every architecture keeps shape, starts as the identity, runs 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from pipelines.networks import (
    CBAM,
    GENERATORS,
    PlainResidualCNN,
    ResidualUNet,
    build_generator,
    count_parameters,
    spatial_dims,
)

CASES = [
    ("plain", {"features": 8, "blocks": 4}),
    ("plain", {"features": 8, "blocks": 5, "cbam": 2}),
    ("unet", {"features": 4, "levels": 2}),
    ("unet", {"features": 4, "levels": 3, "cbam": True}),
]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(("arch", "params"), CASES)
def test_shape_preserved_and_identity_at_init(arch: str, params: dict, dims: int) -> None:
    torch.manual_seed(0)
    g = build_generator(arch, {**params, "dims": dims})
    shape = (2, 1, 21, 19) if dims == 2 else (1, 1, 7, 13, 11)  # sizes not divisible by 8
    x = torch.randn(shape)
    y = g(x)
    assert y.shape == x.shape
    assert torch.allclose(y, x)  # zero-initialised output layer + global residual


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
