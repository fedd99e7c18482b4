"""MR receiver noise: the k-space window a scanner acquires through, and grain in its image.

A model trained by regression on pairs predicts the mean target image given the source,
smoother than any acquisition; radiomic texture features and scanner classifiers see that.
A model folder's ``grain`` gives back a fraction of the target scanner's own noise: complex
white noise, band-limited by the scanner's k-space window and added before the magnitude,
as a receiver adds it (Rician, so the dark background stays non-negative). The same input
always gets the same grain (the seed is the input's sha256). The trainers use the same
noise to synthesise a scanner's acquisition (:mod:`trainers.acquisition`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def kspace_window(size: int, edge: float, apodisation: float) -> np.ndarray:
    """1D window over ``np.fft.fftfreq(size)``: 1 at the centre, a raised-cosine taper
    over the outer ``apodisation`` fraction of the acquired band, 0 beyond ``edge``
    (fraction of Nyquist acquired: PercentSampling / 100)."""
    f = np.abs(np.fft.fftfreq(size)) * 2.0
    taper = np.clip((edge - f) / max(apodisation * edge, 1e-6), 0.0, 1.0)
    return np.where(f <= edge, 0.5 - 0.5 * np.cos(np.pi * taper), 0.0)


def kspace_window_2d(rows: int, cols: int, edge: float, apodisation: float) -> np.ndarray:
    """The separable 2D window (rows, cols) over ``np.fft.fft2``'s frequencies."""
    return kspace_window(rows, edge, apodisation)[:, None] * \
        kspace_window(cols, edge, apodisation)[None, :]


def receiver_noise(shape: tuple[int, ...], sigma: float, edge: float, apodisation: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Complex noise (..., H, W) through the 2D window, ``sigma`` per channel after it."""
    window = kspace_window_2d(*shape[-2:], edge, apodisation)
    white = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    noise = np.fft.ifft2(np.fft.fft2(white) * window)
    return noise * (sigma / math.sqrt(float(np.mean(window ** 2))))


@dataclass(frozen=True)
class Grain:
    """Target-scanner noise added to a harmonised MR magnitude image.

    ``sigma`` is the noise per channel relative to the image's 99.5th percentile, measured
    on the target scanner's series; ``edge`` and ``apodisation`` its k-space window;
    ``fraction`` of that noise is added (chosen at training: the least that makes the
    output pass for the target scanner).
    """

    sigma: float
    edge: float
    apodisation: float
    fraction: float

    def __post_init__(self) -> None:
        for name, low, high in (("sigma", 0.0, 1.0), ("edge", 0.05, 1.0),
                                ("apodisation", 0.0, 1.0), ("fraction", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not low <= value <= high:
                raise ValueError(f"grain {name} must be a number in [{low}, {high}],"
                                 f" got {value!r}")

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Grain:
        unknown = set(spec) - {"sigma", "edge", "apodisation", "fraction"}
        if unknown:
            raise ValueError(f"grain has unknown keys {sorted(unknown)}")
        try:
            return cls(**spec)
        except TypeError as exc:
            raise ValueError(f"grain needs sigma, edge, apodisation and fraction: {exc}") \
                from None

    def to_spec(self) -> dict[str, float]:
        return asdict(self)


def add_grain(volume: np.ndarray, grain: Grain) -> np.ndarray:
    """``volume`` (D, H, W) of non-negative magnitudes with the grain added, seeded by the
    input's bytes, so re-harmonising a series reproduces it exactly."""
    if grain.fraction == 0:
        return volume
    data = np.ascontiguousarray(volume, dtype=np.float64)
    seed = int.from_bytes(hashlib.sha256(data.tobytes()).digest()[:8], "little")
    scale = float(np.percentile(data, 99.5))
    noise = receiver_noise(data.shape, grain.fraction * grain.sigma * scale, grain.edge,
                           grain.apodisation, np.random.default_rng(seed))
    return np.abs(np.clip(data, 0.0, None) + noise).astype(volume.dtype)
