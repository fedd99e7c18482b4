"""Training data: series loading, body masks, pairing, held-out splits, patch sampling.

Patches are drawn with their centre inside the body mask: air around the patient is
half of every CT slice, carries no scanner texture worth learning, and would otherwise
dominate the pixel losses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from pipelines.intensity import Normalisation
from pipelines.series import SeriesError, Volume, element_text, find_series, load_series
from pipelines.spacing import resample_volume


def body_mask(volume: np.ndarray, modality: str) -> np.ndarray:
    """The patient's body in a (D, H, W) volume of real values (HU or MR signal).

    CT: above -500 HU; MR: above 10% of the 99th percentile. Then per slice holes
    (lungs, bowel gas) are filled and only the largest 3D component is kept, which drops
    the table and noise specks.
    """
    if modality.upper() == "CT":
        mask = volume > -500
    else:
        mask = volume > 0.1 * np.percentile(volume, 99)
    mask = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask


def match_slices(source_z: Sequence[float], target_z: Sequence[float],
                 tolerance: float = 0.01) -> list[tuple[int, int]]:
    """Index pairs of slices at the same position (mm along the slice normal)."""
    target = np.asarray(target_z, dtype=float)
    pairs = []
    for i, z in enumerate(source_z):
        j = int(np.argmin(np.abs(target - z))) if len(target) else -1
        if j >= 0 and abs(target[j] - z) <= tolerance:
            pairs.append((i, j))
    return pairs


@dataclass
class PatchSampler:
    """Random patches from normalised (D, H, W) volumes, centred inside their masks.

    With ``partners`` (the paired target volumes, same shape) each call returns the
    co-located target patch as well, with the same random flip.
    2D patches are ``patch x patch`` slices; 3D ones ``min(patch, D) x patch x patch``.
    """

    volumes: Sequence[np.ndarray]
    masks: Sequence[np.ndarray]
    patch: int
    dims: int = 2
    seed: int = 0
    partners: Sequence[np.ndarray] | None = None
    flip: bool = True

    def __post_init__(self) -> None:
        if not self.volumes:
            raise ValueError("no volumes to sample patches from")
        self.rng = np.random.default_rng(self.seed)
        self.centres: list[np.ndarray] = []
        for vol, mask in zip(self.volumes, self.masks, strict=True):
            if min(vol.shape[1:]) < self.patch:
                raise ValueError(f"patch size {self.patch} exceeds the image size"
                                 f" {vol.shape[1]}x{vol.shape[2]}")
            idx = np.argwhere(mask)
            if len(idx) == 0:  # nothing segmented: fall back to the whole volume
                idx = np.argwhere(np.ones_like(mask, dtype=bool))
            self.centres.append(idx)
        weights = np.array([len(c) for c in self.centres], dtype=float)
        self.weights = weights / weights.sum()

    def _box(self, vol: np.ndarray, centre: np.ndarray) -> tuple[slice, ...]:
        depth = 1 if self.dims == 2 else min(self.patch, vol.shape[0])
        sizes = (depth, self.patch, self.patch)
        box = []
        for c, size, extent in zip(centre, sizes, vol.shape, strict=True):
            start = int(np.clip(c - size // 2, 0, extent - size))
            box.append(slice(start, start + size))
        return tuple(box)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` patches as (n, 1, ...) float tensors: source and (if paired) target."""
        xs, ys = [], []
        for v in self.rng.choice(len(self.volumes), size=n, p=self.weights):
            centres = self.centres[v]
            box = self._box(self.volumes[v], centres[self.rng.integers(len(centres))])
            flip = self.flip and bool(self.rng.integers(2))
            for out, vol in ((xs, self.volumes[v]),
                             *(((ys, self.partners[v]),) if self.partners else ())):
                p = vol[box]
                p = p[..., ::-1] if flip else p
                out.append(p[0] if self.dims == 2 else p)
        return _batch(xs), (_batch(ys) if ys else None)


def _batch(patches: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(patches)))[:, None].float()


DESCRIBE = ("Modality", "Manufacturer", "ManufacturerModelName", "ConvolutionKernel",
            "MagneticFieldStrength", "SeriesDescription")


@dataclass
class Series:
    """One loaded series: its volume (real values), body mask and identity."""

    uid: str
    files: list[Path]
    volume: Volume
    mask: np.ndarray

    @property
    def header(self) -> Any:
        return self.volume.datasets[0]

    @property
    def modality(self) -> str:
        return str(self.header.get("Modality", "")).upper()

    @property
    def frame_of_reference(self) -> str:
        return str(self.header.get("FrameOfReferenceUID", ""))

    @property
    def positions(self) -> np.ndarray:
        """Slice positions (mm) along the slice normal, in array order."""
        normal = self.volume.direction[0]
        return np.array([np.dot(f.position, normal) for f in self.volume.frames])

    def describe(self) -> dict[str, Any]:
        """The domain description written into model.json (key DICOM tags)."""
        out = {}
        for keyword in DESCRIBE:
            value = element_text(self.header, keyword)
            if value is not None:
                out[keyword] = value
        return out


def load_series_dir(root: Path, log: Callable[[str], None] = print) -> list[Series]:
    """Every loadable series under ``root``; series that cannot be volumes are skipped
    with their one-line reason (a site's archive always holds some localisers and junk)."""
    found = []
    for uid, files in find_series(root).items():
        try:
            volume = load_series(files)
        except SeriesError as exc:
            log(f"skipping series {uid}: {exc}")
            continue
        modality = str(volume.datasets[0].get("Modality", ""))
        found.append(Series(uid, files, volume, body_mask(volume.array, modality)))
    return found


def at_pixel_spacing(series: Sequence[Series], spacing: float) -> list[Series]:
    """The series resampled in-plane to ``spacing`` mm (0: as they are), with their body
    masks drawn again, as the node will resample what it harmonises (:mod:`pipelines.spacing`)."""
    if not spacing:
        return list(series)
    out = []
    for s in series:
        volume = resample_volume(s.volume, (spacing, spacing))
        out.append(s if volume is s.volume else
                   Series(s.uid, s.files, volume, body_mask(volume.array, s.modality)))
    return out


def normalisation_for(modality: str) -> Normalisation:
    """CT: a fixed HU window (HU mean the same on every scanner); MR: per-volume
    percentiles (MR signal has no absolute scale across scanners)."""
    spec = {"kind": "hu_window", "low": -1024, "high": 3071} if modality.upper() == "CT" \
        else {"kind": "percentile", "low": 0.5, "high": 99.5}
    return Normalisation.from_spec(spec)


@dataclass
class Pair:
    """Voxel-aligned source and target slices of one frame of reference."""

    source: Series
    target: Series
    source_slices: list[int]
    target_slices: list[int]


def pair_series(sources: Sequence[Series], targets: Sequence[Series],
                tolerance: float = 0.01) -> list[Pair]:
    """Pairs of series sharing a FrameOfReferenceUID and image grid, matched slice by
    slice on their position along the normal (the same raw data in two kernels)."""
    pairs = []
    for s in sources:
        for t in targets:
            if not s.frame_of_reference or s.frame_of_reference != t.frame_of_reference:
                continue
            if s.volume.array.shape[1:] != t.volume.array.shape[1:] or not np.allclose(
                    s.volume.spacing[1:], t.volume.spacing[1:], atol=1e-3):
                continue
            matched = match_slices(s.positions, t.positions, tolerance)
            if matched:
                pairs.append(Pair(s, t, [i for i, _ in matched], [j for _, j in matched]))
                break
    return pairs


def split_holdout(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for training and held-out validation: whole series, at least one each."""
    if count < 2:
        raise ValueError("need at least two series per domain (one is held out for"
                         " validation)")
    order = np.random.default_rng(seed).permutation(count).tolist()
    held = min(max(1, round(count * fraction)), count - 1)
    return sorted(order[held:]), sorted(order[:held])
