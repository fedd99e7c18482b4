"""A small scanner (domain) classifier, trained here on the data at hand.

It serves twice: ``evaluate`` trains one on unharmonised source vs target images and
reports its accuracy on harmonised images (0.5 = indistinguishable for two domains),
and unpaired training uses a frozen one as the feature network of the Gram texture
loss. No pretrained VGG weights exist offline, and a network trained to tell these
scanners apart has, by construction, features that see exactly their texture
differences (noise grain, sharpness, contrast), which is what the loss must match.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainers.data import PatchSampler


class DomainClassifier(nn.Module):
    """Three conv stages (3x3 conv, LeakyReLU, 2x average pool), global pool, linear.

    One conv per stage keeps it cheap enough to train inside every ``evaluate`` on a CPU;
    the first stage runs at full resolution, where noise grain lives.

    The first stage sees the image and its high-pass residual (image minus its 3x3 local
    mean) scaled by ``texture_gain`` to unit spread on the training data (:meth:`calibrate`).
    Scanners of one class differ by a few HU of noise grain against a normalised range of
    thousands of HU; in the raw image that is lost under the anatomy, in the residual it is
    the whole signal.

    Global mean and standard-deviation pooling of every stage make it patch-size agnostic
    and hand the head texture energy at three scales (noise grain, edges) directly, on a
    log scale so that a faint noise difference weighs like a strong one.
    :meth:`features` exposes the stage outputs for Gram matrices.
    """

    def __init__(self, channels: int = 1, features: int = 16, dims: int = 2,
                 classes: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.pool = nn.AvgPool2d(2) if dims == 2 else nn.AvgPool3d(2)
        self.local_mean = (nn.AvgPool2d if dims == 2 else nn.AvgPool3d)(
            3, stride=1, padding=1, count_include_pad=False)
        self.register_buffer("texture_gain", torch.tensor(1.0))
        widths = [2 * channels, features, features * 2, features * 4]
        self.stages = nn.ModuleList(
            nn.Sequential(conv(widths[i], widths[i + 1], 3, padding=1), nn.LeakyReLU(0.2))
            for i in range(3))
        self.head = nn.Linear(2 * sum(widths[1:]), classes)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """High-pass residual: the image minus its 3x3 local mean."""
        return x - self.local_mean(x)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Set ``texture_gain`` so the residual of these images has unit spread."""
        self.texture_gain.fill_(1.0 / (float(self.residual(x).std()) + 1e-6))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        x = torch.cat([x, self.residual(x) * self.texture_gain], dim=1)
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else self.pool(x))
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = []
        for maps in self.features(x):
            flat = maps.flatten(2)
            stats += [flat.mean(-1), torch.log(flat.std(-1) + 1e-4)]
        return self.head(torch.cat(stats, dim=1))


def train_classifier(samplers: list[PatchSampler], steps: int = 300, batch: int = 32,
                     lr: float = 1e-3, features: int = 16, seed: int = 0,
                     device: str | torch.device = "cpu") -> DomainClassifier:
    """Fit a classifier with one class per sampler (class i = images of sampler i)."""
    torch.manual_seed(seed)
    dims = samplers[0].dims
    model = DomainClassifier(features=features, dims=dims, classes=len(samplers)).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    per_class = max(batch // len(samplers), 1)
    labels = torch.arange(len(samplers)).repeat_interleave(per_class).to(device)
    model.calibrate(torch.cat([s.sample(per_class)[0] for s in samplers]).to(device))
    model.train()
    for _ in range(steps):
        x = torch.cat([s.sample(per_class)[0] for s in samplers]).to(device)
        loss = F.cross_entropy(model(x), labels)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def balanced_accuracy(model: DomainClassifier, patches: list[torch.Tensor],
                      chunk: int = 64) -> float:
    """Mean over classes of the fraction of ``patches[label]`` predicted as ``label``.

    Balanced, so unequal numbers of images per domain cannot skew it: 0.5 is chance
    for two domains.
    """
    device = next(model.parameters()).device
    scores = []
    for label, batch in enumerate(patches):
        right = sum(int((model(part.to(device)).argmax(1) == label).sum())
                    for part in torch.split(batch, chunk))
        scores.append(right / max(len(batch), 1))
    return float(np.mean(scores))
