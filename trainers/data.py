"""Training data: body masks, series pairing and patch sampling.

Patches are drawn with their centre inside the body mask: air around the patient is
half of every CT slice, carries no scanner texture worth learning, and would otherwise
dominate the pixel losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage


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
