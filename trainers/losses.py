"""Losses for harmonisation training: pixel, structural, adversarial and texture terms.

Everything works on 2D (N, C, H, W) and 3D (N, C, D, H, W) batches alike, so the
training loops never branch on dimensionality.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.networks import radial_frequency


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' region only (as Wang et al.'s SSIM)."""
    dims = x.dim() - 2
    g = _gaussian_window(size, sigma, x)
    fn = F.conv2d if dims == 2 else F.conv3d
    channels = x.shape[1]
    for axis in range(dims):
        shape = [1] * dims
        shape[axis] = size
        kernel = g.view(1, 1, *shape).repeat(channels, 1, *([1] * dims))
        x = fn(x, kernel, groups=channels)
    return x


def lowpass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian low-pass (valid region) of a 2D/3D batch; ``sigma`` in pixels, 0 = unchanged."""
    if sigma <= 0:
        return x
    return _blur(x, 2 * math.ceil(3 * sigma) + 1, sigma)


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float | torch.Tensor = 1.0,
             size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Local SSIM (Gaussian 11-tap window, K1=0.01, K2=0.03) over the valid region.

    Inputs are intensities on ``[0, data_range]``, as in Wang et al.: the luminance term
    compares local means as brightness, and on data centred on zero (HU around water, the
    network's [-1, 1]) it collapses for means near 0, so shift such data first.
    Images smaller than the window shrink it, so small training patches still work.
    """
    size = min(size, *x.shape[2:])
    size -= 1 - size % 2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _blur(x, size, sigma), _blur(y, size, sigma)
    sxx = _blur(x * x, size, sigma) - mx * mx
    syy = _blur(y * y, size, sigma) - my * my
    sxy = _blur(x * y, size, sigma) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))


class SSIMLoss(nn.Module):
    """1 - SSIM: keeps local structure and contrast, which L1 alone blurs away.

    ``low`` is the bottom of the data's range (-1 for the network's [-1, 1]); inputs are
    shifted by it so that SSIM sees non-negative intensities.
    """

    def __init__(self, data_range: float = 1.0, low: float = 0.0) -> None:
        super().__init__()
        self.data_range = data_range
        self.low = low

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1 - ssim_map(x.float() - self.low, y.float() - self.low,
                            self.data_range).mean()


class AdversarialLoss(nn.Module):
    """LSGAN (least squares, the CycleGAN default) or WGAN critic loss.

    ``generator(fake)`` is the generator's loss; ``discriminator(real, fake)`` the
    discriminator's; for WGAN add :func:`gradient_penalty` (WGAN-GP) to the latter.
    """

    def __init__(self, mode: str = "lsgan") -> None:
        super().__init__()
        if mode not in ("lsgan", "wgan-gp"):
            raise ValueError(f"unknown GAN mode '{mode}' (known: lsgan, wgan-gp)")
        self.mode = mode

    def generator(self, fake_score: torch.Tensor) -> torch.Tensor:
        if self.mode == "lsgan":
            return F.mse_loss(fake_score, torch.ones_like(fake_score))
        return -fake_score.mean()

    def discriminator(self, real_score: torch.Tensor, fake_score: torch.Tensor) -> torch.Tensor:
        if self.mode == "lsgan":
            return 0.5 * (F.mse_loss(real_score, torch.ones_like(real_score))
                          + F.mse_loss(fake_score, torch.zeros_like(fake_score)))
        return fake_score.mean() - real_score.mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Gulrajani et al.'s penalty: critic gradient norm 1 on real/fake interpolates."""
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device,
                       dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
    score = critic(mixed)
    (grad,) = torch.autograd.grad(score.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Channel co-activation (N, C, C), normalised by the number of positions (Gatys)."""
    flat = features.flatten(2).float()
    return flat @ flat.transpose(1, 2) / flat.shape[-1]


class GramTextureLoss(nn.Module):
    """CVS-CT's "domain loss": MSE between Gram matrices of a frozen feature network.

    Gram matrices discard where things are and keep which textures co-occur, so the
    loss compares a generated image with an *unpaired* target image. ``features``
    returns a list of feature maps; the target side is averaged over its batch, so the
    generator is pulled to the target domain's texture, not to one random patch. Each
    layer's error is relative to its reference Gram energy, so the weight means the same
    whatever the feature network's activation scale.
    """

    def __init__(self, features: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> None:
        super().__init__()
        self.features = features

    def forward(self, generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fake_maps = self.features(generated)
        with torch.no_grad():
            real_maps = self.features(target)
        loss = generated.new_zeros(())
        for fake, real in zip(fake_maps, real_maps, strict=True):
            ref = gram_matrix(real).mean(0, keepdim=True)
            err = F.mse_loss(gram_matrix(fake), ref.expand(fake.shape[0], -1, -1))
            loss = loss + err / ref.pow(2).mean().clamp_min(1e-12)
        return loss / len(fake_maps)


def radial_power(x: torch.Tensor) -> torch.Tensor:
    """Batch-mean in-plane power spectrum of ``x`` (N, C, [D,] H, W), averaged over rings of
    integer radial frequency (index 0 = the mean, then one ring per frequency step of the
    shorter side): the noise power spectrum's shape, whatever the anatomy's position.
    A Hann window first, or the patch edges' jumps would leak the anatomy's low-frequency
    power into every ring and hide the noise."""
    planes = x.float().reshape(-1, *x.shape[-2:])
    h, w = planes.shape[-2:]
    window = (torch.hann_window(h, periodic=False, device=x.device)[:, None]
              * torch.hann_window(w, periodic=False, device=x.device)[None, :])
    power = torch.fft.rfft2(planes * window).abs().pow(2).mean(0) / window.pow(2).sum()
    ring = (radial_frequency(h, w, x.device) * min(h, w)).round().long().flatten()
    total = torch.zeros(int(ring.max()) + 1, device=x.device).index_add_(0, ring,
                                                                         power.flatten())
    count = torch.bincount(ring, minlength=total.numel()).clamp_min(1)
    return total / count


def _log(power: torch.Tensor) -> torch.Tensor:
    return power.clamp_min(1e-20).log()


def log_radial_power(x: torch.Tensor) -> torch.Tensor:
    return _log(radial_power(x))


def spectrum_error(output: torch.Tensor, source: torch.Tensor,
                   wanted: torch.Tensor) -> torch.Tensor:
    """Mean squared error, over rings, between the log power ratio of ``output`` to its
    ``source`` and the ``wanted`` one (a log ratio of two domains' spectra)."""
    return (log_radial_power(output) - log_radial_power(source.detach()) - wanted).pow(2).mean()


class SpectrumLoss:
    """Noise-power-spectrum matching for unpaired domains: the log ratio of the output's
    radial power spectrum (:func:`radial_power`) to its input's, pulled to the log ratio
    of the two domains' mean spectra, ring by ring (squared error, mean over rings).

    Two CT reconstruction kernels differ by a transfer function that shapes resolution
    and noise texture the same way at every position, and the output/input ratio of one
    batch is that transfer function squared whatever anatomy the batch shows; the
    domains' mean spectra are accumulated over every batch seen (:meth:`observe`), so the
    anatomy of unpaired patches averages out of the reference. The log makes every ring
    count alike, however little power it holds.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def observe(self, domain: str, batch: torch.Tensor) -> None:
        power = radial_power(batch.detach())
        self.sums[domain] = self.sums.get(domain, torch.zeros_like(power)) + power
        self.counts[domain] = self.counts.get(domain, 0) + 1

    def _log_mean(self, domain: str) -> torch.Tensor:
        return _log(self.sums[domain] / self.counts[domain])

    def __call__(self, output: torch.Tensor, source: torch.Tensor, source_domain: str,
                 target_domain: str) -> torch.Tensor:
        wanted = self._log_mean(target_domain) - self._log_mean(source_domain)
        return spectrum_error(output, source, wanted)

    def state(self) -> dict:
        return {"sums": self.sums, "counts": self.counts}

    def load(self, state: dict) -> None:
        self.sums, self.counts = state["sums"], state["counts"]


def masked_l1(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error, restricted to ``mask`` (the body) when one is given."""
    diff = (x.float() - y.float()).abs()
    if mask is None:
        return diff.mean()
    weight = mask.to(diff.dtype).expand_as(diff)
    return (diff * weight).sum() / weight.sum().clamp_min(1.0)

