"""StarGAN v2's style networks (Choi et al. 2020), by name: the mapping network and the style
encoder. Training only: the node harmonises with each domain's reference style, which the
generator keeps (:class:`pipelines.networks.StyleUNet`).

A new one is one class and one line in :data:`MAPPING_NETWORKS` or :data:`STYLE_ENCODERS`;
:func:`build_network` builds any registered network (discriminators too) by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.networks import conv


def _branch(x: torch.Tensor, heads: torch.Tensor, domain: int | torch.Tensor) -> torch.Tensor:
    """``heads`` (N, domains, style_dim): each sample's style from its domain's head."""
    if isinstance(domain, int):
        return heads[:, domain]
    return heads[torch.arange(len(heads), device=heads.device), domain]


class MappingNetwork(nn.Module):
    """Latent code ``z`` -> a style of domain ``y``: a shared MLP, then one head per domain.

    It gives the generator styles that no training image has, so the style space between and
    around the domains' references is meaningful; the diversity loss (off for harmonisation)
    is what would spread them.
    """

    def __init__(self, latent_dim: int = 16, style_dim: int = 16, hidden: int = 64,
                 layers: int = 2, domains: int = 2) -> None:
        super().__init__()
        shared: list[nn.Module] = []
        width = latent_dim
        for _ in range(layers):
            shared += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.shared = nn.Sequential(*shared)
        self.heads = nn.Linear(hidden, domains * style_dim)
        self.style_dim = style_dim

    def forward(self, z: torch.Tensor, domain: int | torch.Tensor) -> torch.Tensor:
        heads = self.heads(self.shared(z)).view(len(z), -1, self.style_dim)
        return _branch(z, heads, domain)


class StyleEncoder(nn.Module):
    """An image of domain ``y`` -> its style code: conv stages with 2x average pooling, global
    mean pooling (the whole patch's style, wherever the anatomy lies), one linear head per
    domain. No normalisation layers: the style of a patch is its own, not its batch's."""

    def __init__(self, channels: int = 1, features: int = 16, stages: int = 3,
                 style_dim: int = 16, domains: int = 2, dims: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = channels
        for i in range(stages):
            out = features * 2 ** min(i, 2)
            layers += [conv(dims, width, out), nn.LeakyReLU(0.2)]
            width = out
        self.stages = nn.ModuleList(nn.Sequential(*layers[2 * i:2 * i + 2])
                                    for i in range(stages))
        self.dims, self.style_dim = dims, style_dim
        self.heads = nn.Linear(width, domains * style_dim)

    def forward(self, x: torch.Tensor, domain: int | torch.Tensor) -> torch.Tensor:
        pool = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
        h = x
        for i, stage in enumerate(self.stages):
            h = stage(h if i == 0 else pool(h, 2))
        heads = self.heads(h.flatten(2).mean(-1)).view(len(x), -1, self.style_dim)
        return _branch(x, heads, domain)


MAPPING_NETWORKS: dict[str, Callable[..., nn.Module]] = {"mlp": MappingNetwork}
STYLE_ENCODERS: dict[str, Callable[..., nn.Module]] = {"conv": StyleEncoder}


def build_network(registry: Mapping[str, Callable[..., nn.Module]], name: str, what: str,
                  **params: Any) -> nn.Module:
    """Instantiate ``registry[name]``; unknown names fail with the known ones."""
    if name not in registry:
        raise ValueError(f"unknown {what} '{name}' (known: {', '.join(sorted(registry))})")
    return registry[name](**params)
