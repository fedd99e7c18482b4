"""Generator architectures, by name.

A new architecture is one ``nn.Module`` class and one line in :data:`GENERATORS`.
Every generator maps a normalised image batch (N, C, H, W) or (N, C, D, H, W) to the
same shape, so the runtime can tile, batch and blend without knowing which it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def conv(dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Module:
    """A 'same'-padded 2D or 3D convolution; reflection padding avoids border artefacts."""
    cls = nn.Conv2d if dims == 2 else nn.Conv3d
    mode = "reflect" if dims == 2 else "replicate"
    return cls(cin, cout, kernel, stride=stride, padding=kernel // 2, padding_mode=mode)


class PlainResidualCNN(nn.Module):
    """CHAIMELEON's "plain CNN": stacked 3x3 convs, LeakyReLU(0.1), no BN, global residual.

    The network predicts the difference between the input and the target kernel's image,
    so an untrained network is the identity, which is the safe starting point for CT.
    """

    def __init__(self, channels: int = 1, features: int = 64, blocks: int = 12,
                 dims: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv(dims, channels, features), nn.LeakyReLU(0.1)]
        for _ in range(blocks - 2):
            layers += [conv(dims, features, features), nn.LeakyReLU(0.1)]
        layers.append(conv(dims, features, channels))
        self.body = nn.Sequential(*layers)
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


GENERATORS: dict[str, Callable[..., nn.Module]] = {
    "plain": PlainResidualCNN,
}


def build_generator(architecture: str, params: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a registered generator; unknown names fail with the list of known ones."""
    try:
        factory = GENERATORS[architecture]
    except KeyError:
        raise ValueError(f"unknown generator architecture '{architecture}'"
                         f" (known: {', '.join(sorted(GENERATORS))})") from None
    try:
        return factory(**(params or {}))
    except TypeError as exc:
        raise ValueError(f"bad parameters for architecture '{architecture}': {exc}") from None


def spatial_dims(params: dict[str, Any] | None) -> int:
    """2 or 3: how many spatial axes a generator built with ``params`` expects."""
    return int((params or {}).get("dims", 2))
