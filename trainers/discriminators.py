"""Discriminators by name: PatchGAN (Isola et al.) and StarGAN v2's multi-task one, 2D or 3D.

Each output unit judges one receptive-field patch (70x70 for 3 layers at 64 features),
which is what scanner texture is: local noise grain and edge response, not anatomy.
A new discriminator is one class and one line in :data:`DISCRIMINATORS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class PatchGAN(nn.Module):
    """C64-C128-C256-C512 style: 4x4 stride-2 convs, InstanceNorm, LeakyReLU(0.2).

    ``layers`` stride-2 stages set the patch size (1: 16, 2: 34, 3: 70 pixels). Instance
    norm (never batch norm) keeps the WGAN-GP penalty valid per sample.
    """

    def __init__(self, channels: int = 1, features: int = 64, layers: int = 3,
                 dims: int = 2, outputs: int = 1) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d
        blocks: list[nn.Module] = [conv(channels, features, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = features
        for i in range(1, layers + 1):
            out = features * 2 ** min(i, 3)
            stride = 2 if i < layers else 1
            blocks += [conv(width, out, 4, stride, 1), norm(out, affine=True), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(conv(width, outputs, 4, 1, 1))
        self.model = nn.Sequential(*blocks)

    def forward(self, x):  # noqa: ANN001, ANN201 - plain nn.Module signature
        return self.model(x)


class MultiTaskDiscriminator(nn.Module):
    """StarGAN v2's discriminator: one shared PatchGAN trunk, one output map per domain.

    ``forward(x, domain)`` returns the map of domain ``domain`` (an int for the whole batch,
    or one per sample): "is this a real image of that domain?". Each domain's branch learns
    its own scanner's texture while the trunk's features are shared by all.
    """

    def __init__(self, channels: int = 1, features: int = 64, layers: int = 3,
                 dims: int = 2, domains: int = 2) -> None:
        super().__init__()
        self.trunk = PatchGAN(channels, features, layers, dims, outputs=domains)

    def forward(self, x: torch.Tensor, domain: int | torch.Tensor) -> torch.Tensor:
        maps = self.trunk(x)
        if isinstance(domain, int):
            return maps[:, domain:domain + 1]
        return maps[torch.arange(len(maps), device=maps.device), domain][:, None]


DISCRIMINATORS: dict[str, Callable[..., nn.Module]] = {
    "patchgan": PatchGAN,
    "multitask": MultiTaskDiscriminator,
}
