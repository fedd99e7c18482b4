"""Paired image metrics inside a body mask: PSNR, SSIM, RMSE, NCC.

All are computed in real units (HU for CT; for MR the per-volume percentile-normalised
values, as MR signal has no absolute scale across scanners) and only inside the body
mask, so air around the patient, which every method gets right, cannot inflate them.
``data_range`` for PSNR and SSIM is the target's max - min inside the mask (the
scikit-image convention for float images), recorded next to the numbers; SSIM sees both
images shifted by the target's minimum inside the mask, i.e. on ``[0, data_range]``, as its
luminance term assumes non-negative intensities (on HU or zero-centred MR values it
collapses wherever the local mean is near 0 and ranks offsets by where they happen).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipelines.intensity import normalise
from trainers.data import normalisation_for
from trainers.losses import ssim_map

SSIM_WINDOW = 11


def data_range(target: np.ndarray, mask: np.ndarray) -> float:
    values = target[mask]
    return float(values.max() - values.min()) if values.size else 1.0


def rmse(image: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sqrt(np.mean((image[mask].astype(np.float64) - target[mask]) ** 2)))


def psnr(image: np.ndarray, target: np.ndarray, mask: np.ndarray, peak: float) -> float:
    error = rmse(image, target, mask)
    return math.inf if error == 0 else 20 * math.log10(peak / error)


def ncc(image: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Zero-normalised cross-correlation (Pearson r of the voxel values)."""
    a = image[mask].astype(np.float64)
    b = target[mask].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def ssim(image: np.ndarray, target: np.ndarray, mask: np.ndarray, peak: float) -> float:
    """Mean 2D SSIM (Gaussian 11-tap, per slice) over window centres inside the mask, on
    intensities shifted by the target's minimum inside the mask."""
    low = np.float32(target[mask].min()) if mask.any() else np.float32(target.min())
    x = torch.from_numpy(np.ascontiguousarray(image - low, dtype=np.float32))[:, None]
    y = torch.from_numpy(np.ascontiguousarray(target - low, dtype=np.float32))[:, None]
    local = ssim_map(x, y, peak, size=SSIM_WINDOW)[:, 0].numpy()
    r = (SSIM_WINDOW - 1) // 2
    inside = mask[:, r:mask.shape[1] - r, r:mask.shape[2] - r]
    return float(local[inside].mean()) if inside.any() else float(local.mean())


def image_metrics(image: np.ndarray, target: np.ndarray, mask: np.ndarray,
                  peak: float) -> dict[str, float]:
    """PSNR (dB), SSIM, RMSE and NCC of ``image`` against ``target`` (same grid)."""
    return {"psnr": psnr(image, target, mask, peak), "ssim": ssim(image, target, mask, peak),
            "rmse": rmse(image, target, mask), "ncc": ncc(image, target, mask)}


def metric_units(volume: np.ndarray, modality: str) -> np.ndarray:
    """CT stays in HU; MR is percentile-normalised per volume (0.5..99.5 -> -1..1), the
    only scale on which two MR scanners' images can be compared value by value."""
    if modality.upper() == "CT":
        return volume
    return normalise(volume, normalisation_for(modality))[0]


def metric_unit_name(modality: str) -> str:
    return "HU" if modality.upper() == "CT" else "MR signal, percentile-normalised"
