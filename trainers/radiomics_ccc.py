"""Radiomic feature reproducibility: Lin's concordance (CCC) per pyradiomics feature class.

As in CVS-CT: square ROIs inside the body at the same positions in the image under test and
in the target image; for every feature, the CCC across ROIs between the two; the mean over
the features of a class is that class's score (1 = the features a radiomics study would
compute are interchangeable between the two images). Bins have a fixed width in the
target's units (25 HU for CT, 0.05 of the normalised MR range), identical for every image
compared, so texture features see intensity differences instead of normalising them away.
The share of features with CCC >= 0.85 (Choe et al., Radiology 2019) is a radiomics study's
reading of the same numbers: which features it may pool across scanners.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from radiomics import featureextractor
from scipy import ndimage

CLASSES = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
TEXTURE = CLASSES[1:]
REPRODUCIBLE = 0.85  # CCC from which a feature counts as reproducible (Choe et al. 2019)


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's concordance correlation coefficient; NaN when both are constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    vx, vy = x.var(), y.var()
    denom = vx + vy + (x.mean() - y.mean()) ** 2
    if denom == 0:
        return float("nan")
    return float(2 * np.mean((x - x.mean()) * (y - y.mean())) / denom)


def roi_corners(masks: Sequence[np.ndarray], size: int, count: int,
                seed: int = 0) -> list[tuple[int, int, int, int]]:
    """(volume, slice, row, col) corners of ``count`` ROIs lying wholly inside the body."""
    rng = np.random.default_rng(seed)
    candidates = []
    for v, mask in enumerate(masks):
        # an ROI fits where the whole size x size square is body: erode by the ROI
        inner = ndimage.binary_erosion(mask, np.ones((1, size, size), bool), border_value=0)
        z, r, c = np.nonzero(inner)
        candidates += [(v, zi, ri - size // 2, ci - size // 2) for zi, ri, ci in zip(
            z.tolist(), r.tolist(), c.tolist(), strict=True)]
    if not candidates:
        return []
    picks = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return [candidates[i] for i in sorted(picks)]


def _extractor(bin_width: float) -> featureextractor.RadiomicsFeatureExtractor:
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    ext = featureextractor.RadiomicsFeatureExtractor(binWidth=bin_width, force2D=True,
                                                     label=1)
    ext.disableAllFeatures()
    for name in CLASSES:
        ext.enableFeatureClassByName(name)
    return ext


def roi_features(volumes: Sequence[np.ndarray], corners: Sequence[tuple[int, int, int, int]],
                 size: int, bin_width: float) -> dict[str, np.ndarray]:
    """Feature name -> values over the ROIs (one extraction per ROI, 2D)."""
    ext = _extractor(bin_width)
    mask = sitk.GetImageFromArray(np.ones((1, size, size), np.uint8))
    rows: dict[str, list[float]] = {}
    for v, z, r, c in corners:
        roi = volumes[v][z:z + 1, r:r + size, c:c + size].astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = ext.execute(sitk.GetImageFromArray(roi), mask)
        for key, value in result.items():
            if key.startswith("original_"):
                rows.setdefault(key.removeprefix("original_"), []).append(float(value))
    return {k: np.asarray(v) for k, v in rows.items()}


def feature_ccc(test: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray]
                ) -> dict[str, float]:
    """CCC of every feature between the image under test and the target (NaN: constant in
    both)."""
    return {k: ccc(test[k], target[k]) for k in target}


def class_ccc(test: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray]
              ) -> dict[str, float]:
    """Mean CCC per feature class (features constant in both images are skipped)."""
    cccs = feature_ccc(test, target)
    out = {}
    for cls in CLASSES:
        values = [v for k, v in cccs.items() if k.startswith(cls + "_")]
        finite = [v for v in values if np.isfinite(v)]
        out[cls] = float(np.mean(finite)) if finite else float("nan")
    texture = [out[c] for c in TEXTURE if np.isfinite(out[c])]
    out["texture_mean"] = float(np.mean(texture)) if texture else float("nan")
    return out


def reproducible_share(cccs: Mapping[str, float], threshold: float = REPRODUCIBLE
                       ) -> dict[str, float]:
    """Share of features with CCC >= ``threshold`` per class and ``overall`` (Choe et al.,
    Radiology 2019: 0.85); features constant in both images are not counted."""
    out = {}
    for cls in (*CLASSES, "overall"):
        values = [v for k, v in cccs.items() if np.isfinite(v)
                  and (cls == "overall" or k.startswith(cls + "_"))]
        out[cls] = float(np.mean([v >= threshold for v in values])) if values else float("nan")
    return out
