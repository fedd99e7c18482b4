"""A scanner's acquisition, fitted from unpaired series, to synthesise its images.

Paired regression recovers a harmonisation that unpaired adversarial training does not,
but sites rarely scan the same patients twice. The source scanner's acquisition can be
learnt instead, and run on the target scanner's series to make pairs (back-translation):

    source(s) = | W * (h(s) + n) |

with ``s`` a target image relative to its 99.5th percentile, ``h`` a monotone contrast
curve (piecewise linear), ``W`` the source's k-space window (its edge from the header's
PercentSampling, its taper fitted) and ``n`` complex receiver noise (sigma fitted). The
fit matches the synthetic images' intensity distribution (inside the body and over the
whole field) and radial power spectrum to the real source series': statistics of each
scanner's own series, so no patient need be scanned on both. Noise is the information a
real acquisition destroys; a learnt inverse generator (CycleGAN's) keeps what it needs to
invert itself, and a network trained on its pairs learns to undo it instead.

:func:`background_noise` measures a scanner's receiver noise where the image is nothing
else (the air around the head): the grain :mod:`pipelines.grain` gives back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipelines.grain import kspace_window_2d, receiver_noise

Log = Callable[[str], None]
KNOTS = 33             # contrast curve: values at 33 inputs from -0.2 to 1.3 (x p99.5)
BINS = 32              # radial power spectrum bins, 0 to the corner of k-space
QUANTILES = 2000       # intensity distributions are compared at this many quantiles
SPECTRUM_WEIGHT = 0.2  # of the mean absolute log power-spectrum difference


def relative(volume: np.ndarray) -> tuple[np.ndarray, float]:
    """The volume over its 99.5th percentile (zero stays zero, as a magnitude's must)."""
    scale = float(np.percentile(volume, 99.5)) or 1.0
    return (volume / scale).astype(np.float32), scale


@dataclass(frozen=True)
class Acquisition:
    """The fitted forward model: contrast curve, k-space window and receiver noise."""

    knots: tuple[float, ...]
    values: tuple[float, ...]
    sigma: float
    edge: float
    apodisation: float

    def synthesise(self, volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The source scanner's image (D, H, W) of a target one, in the target's scale."""
        rel, scale = relative(volume)
        signal = np.interp(rel, self.knots, self.values)
        noise = receiver_noise(rel.shape, self.sigma, self.edge, self.apodisation, rng)
        window = kspace_window_2d(*rel.shape[-2:], self.edge, self.apodisation)
        image = np.fft.ifft2(np.fft.fft2(signal) * window) + noise
        return (np.abs(image) * scale).astype(np.float32)

    def to_spec(self) -> dict[str, object]:
        spec = asdict(self)
        spec["knots"], spec["values"] = ([round(v, 5) for v in spec[k]]
                                         for k in ("knots", "values"))
        return spec


def _radial_bins(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.fft.fftfreq(size).abs() * 2.0
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    bins = (radius / radius.max() * (BINS - 1)).round().long().flatten()
    return bins, torch.bincount(bins, minlength=BINS).clamp(min=1)


def _log_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Log of the radially averaged power spectrum of (N, H, W) images."""
    bins, counts = _radial_bins(images.shape[-1])
    centred = images - images.mean((-2, -1), keepdim=True)
    power = torch.fft.fft2(centred).abs().pow(2).mean(0).flatten()
    return torch.log(torch.zeros(BINS).index_add(0, bins, power) / counts + 1e-12)


def _quantiles(values: torch.Tensor) -> torch.Tensor:
    ordered = torch.sort(values)[0]
    at = (torch.linspace(0, 1, QUANTILES) * (len(ordered) - 1)).long()
    return ordered[at]


def fit_acquisition(targets: Sequence[np.ndarray], target_masks: Sequence[np.ndarray],
                    sources: Sequence[np.ndarray], source_masks: Sequence[np.ndarray],
                    edge: float, steps: int = 400, batch: int = 32, seed: int = 0,
                    log: Log = print) -> Acquisition:
    """Fit the source scanner's acquisition of target images (all (D, N, N) volumes of one
    square matrix and pixel size; masks the bodies): see the module docstring."""
    if not 0.05 <= edge <= 1.0:
        raise ValueError(f"k-space edge must be in [0.05, 1], got {edge}")
    sizes = {v.shape[1:] for v in (*targets, *sources)}
    if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        raise ValueError(f"the acquisition is fitted on one square matrix, got {sorted(sizes)}")
    gen = torch.Generator().manual_seed(seed)
    tgt = torch.from_numpy(np.concatenate([relative(v)[0] for v in targets]))
    tgt_mask = torch.from_numpy(np.concatenate(target_masks))
    src = torch.from_numpy(np.concatenate([relative(v)[0] for v in sources]))
    src_body = _quantiles(src[torch.from_numpy(np.concatenate(source_masks))])
    src_all, src_spectrum = _quantiles(src.flatten()), _log_spectrum(src)
    n = tgt.shape[-1]
    knots = torch.linspace(-0.2, 1.3, KNOTS)
    steps_up = torch.nn.Parameter(torch.full((KNOTS - 1,), -1.0))  # softplus: increasing h
    start = torch.nn.Parameter(torch.tensor(0.0))
    log_sigma = torch.nn.Parameter(torch.tensor(math.log(0.03)))
    taper = torch.nn.Parameter(torch.tensor(0.0))                   # sigmoid -> 0.02..0.92
    freq = torch.fft.fftfreq(n).abs() * 2.0

    def curve(x: torch.Tensor) -> torch.Tensor:
        rise = F.softplus(steps_up) * (knots[1] - knots[0])
        values = torch.cat([start[None], start + torch.cumsum(rise, 0)])
        i = torch.clamp(torch.searchsorted(knots, x.contiguous()) - 1, 0, KNOTS - 2)
        t = (x - knots[i]) / (knots[i + 1] - knots[i])
        return values[i] + t * (values[i + 1] - values[i]), values

    def window() -> tuple[torch.Tensor, torch.Tensor]:
        apod = torch.sigmoid(taper) * 0.9 + 0.02
        ramp = ((edge - freq) / (apod * edge)).clamp(0, 1)
        w = torch.where(freq <= edge, 0.5 - 0.5 * torch.cos(math.pi * ramp),
                        torch.zeros_like(freq))
        return w[:, None] * w[None, :], apod

    def synthesise(s: torch.Tensor) -> torch.Tensor:
        w, _ = window()
        sigma = log_sigma.exp() / w.pow(2).mean().sqrt()
        noise = torch.complex(torch.randn(s.shape, generator=gen),
                              torch.randn(s.shape, generator=gen)) * sigma
        return torch.fft.ifft2(torch.fft.fft2(curve(s)[0].to(torch.complex64) + noise) * w).abs()

    optim = torch.optim.Adam([steps_up, start, log_sigma, taper], lr=0.03)
    for step in range(steps):
        pick = torch.randint(0, len(tgt), (min(batch, len(tgt)),), generator=gen)
        out = synthesise(tgt[pick])
        distance = ((_quantiles(out[tgt_mask[pick]]) - src_body).abs().mean()
                    + (_quantiles(out.flatten()) - src_all).abs().mean())
        spectrum = (_log_spectrum(out) - src_spectrum).abs().mean()
        loss = distance + SPECTRUM_WEIGHT * spectrum
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"acquisition fit {step}: distribution {distance.item():.4f},"
                f" spectrum {spectrum.item():.3f}, sigma {log_sigma.exp().item():.4f}")
    with torch.no_grad():
        values, apod, sigma = curve(knots)[1], window()[1].item(), log_sigma.exp().item()
    return Acquisition(tuple(knots.tolist()), tuple(values.tolist()), sigma, edge, apod)


def background_noise(volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                     margin: int = 4) -> float:
    """Receiver noise per channel relative to each volume's 99.5th percentile (median over
    volumes), from the air ``margin`` pixels clear of the body: magnitude noise there is
    Rayleigh, its mean sigma * sqrt(pi / 2). The images' edges are left out (wrap-around,
    zero-filled borders)."""
    found = []
    for volume, mask in zip(volumes, masks, strict=True):
        rel = relative(volume)[0]
        air = ~ndimage.binary_dilation(mask, iterations=margin)
        air[:, :margin], air[:, -margin:], air[:, :, :margin], air[:, :, -margin:] = \
            False, False, False, False
        if air.sum() > 1000:
            found.append(float(rel[air].mean()) / math.sqrt(math.pi / 2))
    if not found:
        raise ValueError("no background (air) around the body to measure noise in")
    return float(np.median(found))
