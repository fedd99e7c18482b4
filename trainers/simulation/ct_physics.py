"""CT acquisition and reconstruction: projection, Poisson counts, log, filtered back-projection.

Parallel-beam geometry, one detector bin per pixel. Projection and back-projection use the
Fourier slice theorem on a two-fold zero-padded grid (bilinear interpolation in k-space with
de-apodisation): O(n^2 log n) per slice instead of O(n^3), which is what lets a 100-slice 512^2
series simulate in under a minute on two cores.

FBP is linear, so the reconstruction of the noisy sinogram splits exactly into the kernel's
response to the noise-free projections (the kernel's transfer function applied to the object:
apodisation, sharp-kernel edge overshoot, detector aperture) plus the FBP of the noise
sinogram. The first is computed as a 2-D filter; the second by gridding FBP of the noise the
Poisson statistics produce: counts ~ Poisson(I0 exp(-p)) with I0 from the domain's mAs, kVp,
bin width and slice thickness, then -log(counts / I0), including photon starvation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from trainers.simulation.domains import CTDomain, CTKernel

# Unattenuated photons reaching the detector per mAs per mm^2 of bin at 120 kVp (order of
# magnitude of a clinical scanner after bowtie and detector efficiency; sets the noise level).
PHOTONS_PER_MAS_MM2 = 2.0e5


def mu_water(kvp: float) -> float:
    """Linear attenuation of water (1/mm) at the effective energy of a kVp spectrum."""
    return float(np.interp(kvp, [80, 100, 120, 140], [0.0213, 0.0200, 0.0192, 0.0186]))


REFERENCE_KVP = 120.0  # the tube voltage HU are defined at here (the phantoms' values)


def kvp_contrast(hu: torch.Tensor, kvp: float) -> torch.Tensor:
    """HU as a ``kvp`` spectrum sees them: the phantoms' HU are 120 kVp values, unchanged there.

    At lower tube voltage the photoelectric effect weighs more, so calcium (bone) and, less,
    fat attenuate further from water: positive HU grow by ``g = 1 + 0.0075 (120 - kVp)``
    (about +15 % at 100 kVp, the size of the bone and iodine shift reported between 120 and
    100 kVp), negative HU by half as much, fading to nothing at air (-1000 HU), which stays.
    """
    if kvp == REFERENCE_KVP:
        return hu
    gain = 1.0 + 0.0075 * (REFERENCE_KVP - kvp)
    shift = torch.where(hu >= 0, hu, 0.5 * hu * (1.0 + hu / 1000.0).clamp(min=0.0))
    return hu + (gain - 1.0) * shift


def kernel_response(kernel: CTKernel, f: torch.Tensor) -> torch.Tensor:
    """Transfer function of an FBP kernel at ``f`` (fraction of Nyquist), ramp divided out.

    Smooth kernels are a Hann-apodised ramp; sharp ones add a raised-cosine boost that lifts
    mid-to-high frequencies above 1 (edge enhancement) and so amplifies high-frequency noise.
    """
    u = (f / kernel.cutoff).clamp(max=1.0)
    window = 0.5 * (1.0 + torch.cos(math.pi * u))
    bump = torch.exp(-(((f - kernel.boost_at) / 0.3) ** 2))
    at_dc = math.exp(-((kernel.boost_at / 0.3) ** 2))
    return window * (1.0 + kernel.boost * (bump - at_dc))   # gain 1 at f = 0: water stays 0 HU


def views_for(n: int) -> int:
    """Parallel views over 180 degrees for an n-pixel grid: 576 at 512, as a scanner with
    1152 fan-beam projections per rotation gives after rebinning."""
    return int(math.ceil(1.125 * n / 8) * 8)


@dataclass(frozen=True)
class _Polar:
    """Where each (view, frequency >= 0) sample of the projections lies on the half-plane
    (rfft) k-grid of the 2n-padded image; the grid layout is unshifted (origin at index 0)."""

    idx: torch.Tensor        # (4, views * h) flat indices of the bilinear corners
    w: torch.Tensor          # (4, views * h) bilinear weights
    mirrored: torch.Tensor   # (views, h) sample taken from the conjugate point (kx < 0)
    apod: torch.Tensor       # (n, n) sinc^2 roll-off of k-space linear interpolation
    crop: torch.Tensor       # (n,) indices of the image inside the wrapped padded grid
    support: torch.Tensor    # detector bins that can cross the n x n image (wrapped order)


@lru_cache(maxsize=4)
def _polar(n: int, views: int) -> _Polar:
    m = 2 * n
    h = m // 2 + 1
    theta = torch.arange(views, dtype=torch.float64) * math.pi / views
    u = torch.arange(h, dtype=torch.float64)
    kx = u[None, :] * torch.cos(theta)[:, None]
    ky = u[None, :] * torch.sin(theta)[:, None]
    mirrored = kx < 0
    kx, ky = torch.where(mirrored, -kx, kx), torch.where(mirrored, -ky, ky)
    x0 = kx.floor().clamp(max=h - 2)
    y0 = ky.floor()
    fx, fy = (kx - x0).flatten(), (ky - y0).flatten()
    x0, y0 = x0.long().flatten(), y0.long().flatten()
    idx = torch.stack([(y0 + dy) % m * h + x0 + dx for dy in (0, 1) for dx in (0, 1)])
    w = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy]).float()
    crop = (torch.arange(n) - n // 2) % m
    s = torch.sinc((torch.arange(n, dtype=torch.float64) - n // 2) / m) ** 2
    reach = math.ceil(n / math.sqrt(2)) + 2
    support = torch.cat([torch.arange(reach + 1), torch.arange(m - reach, m)])
    return _Polar(idx, w, mirrored, (s[:, None] * s[None, :]).float(), crop, support)


def project(mu: torch.Tensor, pixel: float, views: int) -> torch.Tensor:
    """Line integrals (S, views, 2n) of attenuation ``mu`` (S, n, n, 1/mm), bins of ``pixel``,
    detector position t = 0 at bin 0 (wrapped order, as the FFTs want it)."""
    s, n = mu.shape[0], mu.shape[-1]
    m, pol = 2 * n, _polar(n, views)
    padded = mu.new_zeros(s, m, m)
    padded[:, pol.crop[:, None], pol.crop[None, :]] = mu / pol.apod
    spec = torch.fft.rfft2(padded).reshape(s, -1)
    lines = (spec[:, pol.idx] * pol.w).sum(1).reshape(s, views, -1)
    lines = torch.where(pol.mirrored, lines.conj(), lines)
    return torch.fft.irfft(lines, n=m) * pixel


def fbp(sino: torch.Tensor, pixel: float, kernel: CTKernel) -> torch.Tensor:
    """Filtered back-projection (S, n, n) of parallel-beam line integrals (S, views, 2n)."""
    s, views, m = sino.shape
    n, h = m // 2, m // 2 + 1
    pol = _polar(n, views)
    u = torch.arange(h, dtype=torch.float32)
    q = torch.fft.rfft(sino) * (u * kernel_response(kernel, u / n) * math.pi / (views * pixel))
    q = torch.where(pol.mirrored, q.conj(), q)
    grid = torch.zeros(s, m * h, dtype=q.dtype)
    grid.index_add_(1, pol.idx.flatten(), (q.reshape(s, 1, -1) * pol.w).reshape(s, -1))
    grid = grid.view(s, m, h)
    grid[:, :, 0] *= 2.0     # c2r keeps half of what lands on the self-conjugate columns
    grid[:, :, -1] *= 2.0
    img = torch.fft.irfft2(grid, s=(m, m))
    return img[:, pol.crop[:, None], pol.crop[None, :]] / pol.apod


def system_response(kernel: CTKernel, n: int) -> torch.Tensor:
    """2-D transfer function (n, n, rfft layout) of the noise-free reconstruction: the kernel
    times the detector aperture (one pixel wide box: sinc)."""
    fy = torch.fft.fftfreq(n).abs()[:, None]
    fx = torch.fft.rfftfreq(n)[None, :]
    f = torch.sqrt(fx**2 + fy**2) * 2.0                       # fraction of Nyquist
    return kernel_response(kernel, f) * torch.sinc(fx) * torch.sinc(fy)


def acquire(hu: torch.Tensor, pixel: float, domain: CTDomain,
            generator: torch.Generator) -> torch.Tensor:
    """Reconstructed HU (S, n, n) of z-integrated ground-truth HU slices, as the domain's
    scanner would produce them: dose-dependent Poisson noise, kernel, calibration offset."""
    hu = kvp_contrast(hu, domain.kvp)
    n = hu.shape[-1]
    clean = torch.fft.irfft2(torch.fft.rfft2(hu + 1000.0) * system_response(domain.kernel, n),
                             s=(n, n)) - 1000.0
    if math.isinf(domain.mas):  # unlimited exposure: no quantum noise (a metric's ceiling)
        return clean + domain.hu_offset
    mw = mu_water(domain.kvp)
    mu = ((hu + 1000.0) * (mw / 1000.0)).clamp(min=0.0)
    views = views_for(n)
    p = project(mu, pixel, views).clamp(min=0.0)
    i0 = (PHOTONS_PER_MAS_MM2 * (domain.kvp / 120.0) ** 2 * domain.mas / views
          * pixel * domain.slice_thickness)
    support = _polar(n, views).support
    p = p[..., support]
    counts = torch.poisson(i0 * torch.exp(-p), generator=generator).clamp(min=1.0)
    noise = torch.zeros(hu.shape[0], views, 2 * n)
    noise[..., support] = -torch.log(counts / i0) - p
    noise_hu = fbp(noise, pixel, domain.kernel) * (1000.0 / mw)
    return clean + noise_hu + domain.hu_offset
