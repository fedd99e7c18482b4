"""Generators for tests: a fixed 3x3 smoothing convolution (2D or 3D), and small shipped
architectures with random weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipelines.grain import Grain
from pipelines.model_folder import save_model_folder
from pipelines.networks import (
    GENERATORS,
    PlainResidualCNN,
    ReceptiveField,
    build_generator,
    conv,
)

CT_NORM = {"kind": "hu_window", "low": -1024, "high": 3071}
MR_NORM = {"kind": "percentile", "low": 0.5, "high": 99.5}


class Smoother(nn.Module):
    """Blends each pixel with its neighbourhood mean: a deterministic stand-in for a generator."""

    def __init__(self, dims: int = 2, mix: float = 0.5, layers: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(*[conv(dims, 1, 1) for _ in range(layers)])
        with torch.no_grad():
            for layer in self.body:
                layer.weight.fill_(1.0 / layer.weight[0, 0].numel())
                layer.bias.zero_()
        self.mix = mix

    def receptive_field(self) -> ReceptiveField:
        return ReceptiveField(radius=len(self.body))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.mix) * x + self.mix * self.body(x)


def register() -> None:
    GENERATORS.setdefault("test-smoother", Smoother)


def make_model(models_dir: Path, name: str = "smooth", *, modality: str = "CT", dims: int = 2,
               layers: int = 1, version: str = "1.0", mix: float = 0.5,
               pixel_spacing: tuple[float, float] | None = None,
               grain: Grain | None = None) -> Path:
    """Write a model folder holding a :class:`Smoother` (``mix`` 0: the identity)."""
    register()
    params = {"dims": dims, "layers": layers, "mix": mix}
    return save_model_folder(
        models_dir / name, Smoother(**params), name=name, version=version,
        architecture="test-smoother", params=params,
        source={"name": f"{modality.lower()}-sharp", "Modality": modality},
        target={"name": f"{modality.lower()}-smooth", "Modality": modality},
        normalisation=CT_NORM if modality == "CT" else MR_NORM,
        training={"epochs": 0}, validation={"psnr": {"before": 30.0, "after": 31.0}},
        pixel_spacing=pixel_spacing, grain=grain)


def make_plain_model(models_dir: Path, name: str, *, blocks: int = 3, version: str = "1.0",
                     features: int = 4) -> Path:
    """A small residual CNN of a registered architecture, so a node subprocess can load it.

    The last layer is randomised (not the identity) so the output visibly differs.
    """
    torch.manual_seed(0)
    params = {"features": features, "blocks": blocks}
    net = PlainResidualCNN(**params)
    with torch.no_grad():
        net.body[-1].weight.normal_(0, 0.05)
    return save_model_folder(
        models_dir / name, net, name=name, version=version, architecture="plain", params=params,
        source={"name": "siemens-b70f", "Modality": "CT"},
        target={"name": "siemens-b30f", "Modality": "CT"}, normalisation=CT_NORM)


def random_generator(architecture: str, **params) -> nn.Module:
    """A shipped architecture with seeded random weights, output layer included (not the
    identity an untrained residual generator starts as), in eval mode."""
    torch.manual_seed(0)
    net = build_generator(architecture, params).eval()
    last = net.out if hasattr(net, "out") else net.body[-1]
    with torch.no_grad():
        last.weight.normal_(0, 0.5)
    return net
