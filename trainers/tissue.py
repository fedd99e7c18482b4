"""A downstream task for evaluation: tissue segmentation fitted on the target domain only.

MR: grey matter, white matter, CSF; CT: lung, soft tissue, bone. The segmenter is a Gaussian
classifier (one mean and covariance per tissue, with its prior) of two features per voxel,
the intensity in metric units and its 3x3 in-plane mean, fitted on the target scanner's series
against their ground truth; applied to a source scanner's series before and after
harmonisation, its Dice against that series' own ground truth says whether a model built on
the reference scanner works on the harmonised images (the 3D CycleGAN paper's brain-age
check, the CHAIMELEON report's downstream segmentation, in small).

Ground truth exists for series the simulator wrote (:func:`simulated_truth`): the anatomy of
their subject on their slices, averaged over their slice thickness.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from trainers.data import Series, body_mask
from trainers.simulation import geometry, ground_truth

CLASSES = {"MR": ("GM", "WM", "CSF"), "CT": ("lung", "soft tissue", "bone")}
CT_LUNG_BELOW, CT_BONE_FROM = -400.0, 200.0  # HU of the ground truth that separate the classes
SIMULATOR = "dicomnode virtual scanner"      # InstitutionName of simulated series
_PATIENT = re.compile(r"^SIM-(\d+)-(\d+)$")  # PatientID: SIM-<seed>-<subject>
PHANTOMS = {"CHEST": "chest", "HEAD": "head"}


def simulated_truth(series: Series) -> np.ndarray | None:
    """Labels (D, H, W): 0 outside the body, 1..3 the modality's :data:`CLASSES`, for a series
    the simulator wrote (its InstitutionName, PatientID and slice positions say so); None for
    any other series."""
    header = series.header
    found = _PATIENT.match(str(header.get("PatientID", "")))
    if str(header.get("InstitutionName", "")) != SIMULATOR or not found:
        return None
    modality = series.modality
    seed, subject = int(found.group(1)), int(found.group(2))
    slices, size = series.volume.array.shape[0], series.volume.array.shape[2]
    phantom = PHANTOMS.get(str(header.get("BodyPartExamined", "")).upper(), "chest")
    if modality not in CLASSES or series.volume.array.shape[1] != size:
        return None
    geo = geometry(modality, slices, size, _phantom_geometry(modality, phantom))
    if not np.allclose(series.positions, geo.z, atol=1e-3):
        return None
    thickness = float(header.get("SliceThickness", 1.0) or 1.0)
    return _labels(modality, subject, seed, slices, size, thickness, phantom)


@lru_cache(maxsize=16)
def _labels(modality: str, subject: int, seed: int, slices: int, size: int, thickness: float,
            phantom: str) -> np.ndarray:
    """The tissue labels of one simulated acquisition (cached: an evaluation of every ordered
    pair asks for each series' once per pair)."""
    truth = ground_truth(modality, subject, seed, slices, size, thickness=thickness,
                         phantom=phantom)
    if modality == "MR":
        labels = np.where(truth.sum(0) > 0.5, 1 + truth.argmax(0), 0).astype(np.uint8)
    else:
        classes = np.digitize(truth, [CT_LUNG_BELOW, CT_BONE_FROM]).astype(np.uint8) + 1
        labels = np.where(body_mask(truth, "CT"), classes, 0).astype(np.uint8)
    labels.flags.writeable = False
    return labels


def _phantom_geometry(modality: str, phantom: str) -> object | None:
    """The phantom object geometry() reads the field of view from (CT only)."""
    if modality != "CT":
        return None
    from trainers.simulation.series import PHANTOMS as SIMULATED

    return SIMULATED[phantom]


def features(image: np.ndarray) -> np.ndarray:
    """(voxels, 2): intensity and its 3x3 in-plane mean, for every voxel of a (D, H, W) image."""
    local = ndimage.uniform_filter(image.astype(np.float64), size=(1, 3, 3), mode="nearest")
    return np.stack([image.ravel().astype(np.float64), local.ravel()], 1)


@dataclass(frozen=True)
class TissueModel:
    """Per tissue: mean, inverse covariance, log determinant and log prior of its features."""

    means: np.ndarray
    inverse: np.ndarray
    log_norm: np.ndarray

    @classmethod
    def fit(cls, images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> TissueModel:
        """Fitted on the voxels the labels put in a tissue (label > 0)."""
        x = np.concatenate([features(i) for i in images])
        y = np.concatenate([lab.ravel() for lab in labels])
        means, inverse, log_norm = [], [], []
        for k in range(1, int(y.max()) + 1):
            xs = x[y == k]
            if len(xs) < 3:
                raise ValueError(f"tissue {k} has {len(xs)} voxels in the target's truth")
            cov = np.cov(xs.T) + 1e-6 * np.eye(2) * max(float(np.var(x[:, 0])), 1e-12)
            means.append(xs.mean(0))
            inverse.append(np.linalg.inv(cov))
            log_norm.append(np.log(len(xs) / max((y > 0).sum(), 1))
                            - 0.5 * np.linalg.slogdet(cov)[1])
        return cls(np.array(means), np.array(inverse), np.array(log_norm))

    def predict(self, image: np.ndarray, body: np.ndarray) -> np.ndarray:
        """Labels (D, H, W): the most probable tissue inside ``body``, 0 outside."""
        x = features(image)
        d = x[:, None, :] - self.means[None]
        score = self.log_norm[None] - 0.5 * np.einsum("nki,kij,nkj->nk", d, self.inverse, d)
        return np.where(body.ravel(), 1 + score.argmax(1), 0).reshape(image.shape)


def dice(predicted: np.ndarray, truth: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Dice per tissue (1..len(classes)) and their mean."""
    out = {}
    for k, name in enumerate(classes, start=1):
        p, t = predicted == k, truth == k
        total = int(p.sum() + t.sum())
        out[name] = 2.0 * float((p & t).sum()) / total if total else float("nan")
    out["mean"] = float(np.nanmean(list(out.values())))
    return out


def mean_dice(values: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.nanmean([v[k] for v in values])) for k in values[0]}
