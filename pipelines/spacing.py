"""In-plane resampling to the pixel spacing a model works at.

A generator learns anatomy and noise at the scale of its training pixels: an MR model
trained on 0.94 mm pixels sees a 1.9 mm series' structures at half the size it knows. A
model folder may therefore name its ``pixel_spacing``; a series at another spacing is
resampled slice by slice to it, harmonised there and resampled back onto its own grid, so
the derived series keeps the source geometry (as MONAI's ``Spacing`` transform is used
around a network). Pure functions on arrays; the field of view is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import signal

from pipelines.series import Volume

Shape = tuple[int, int]
CHUNK = 16  # slices resampled at a time


def working_shape(shape: Sequence[int], spacing: Sequence[float],
                  target: Sequence[float] | None) -> Shape:
    """Rows and columns covering the field of view of ``shape`` pixels of ``spacing`` (mm,
    row then column) at the ``target`` spacing; ``shape`` itself when ``target`` is None."""
    rows, cols = (int(n) for n in shape)
    if target is None:
        return rows, cols
    r, c = (max(1, round(n * s / t)) for n, s, t in zip((rows, cols), spacing, target,
                                                         strict=True))
    return r, c


def resize_slices(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Every (rows, cols) slice of a (slices, rows, cols) volume resized to ``shape`` by
    Fourier interpolation (the spectrum cropped or zero-padded, float32): what an MR
    scanner's zero-filled reconstruction does, so an image resized up and back is itself
    again, and one resized down keeps every frequency the coarser grid holds (a spatial
    kernel's blur near Nyquist is texture a scanner classifier sees). The volume itself
    when already that size."""
    size = (int(shape[0]), int(shape[1]))
    if volume.shape[1:] == size:
        return volume
    out = np.empty((volume.shape[0], *size), np.float32)
    for start in range(0, volume.shape[0], CHUNK):  # bounds the complex128 spectra
        part = volume[start:start + CHUNK]
        for axis, n in ((1, size[0]), (2, size[1])):
            if part.shape[axis] != n:
                part = signal.resample(part, n, axis=axis)
        out[start:start + CHUNK] = part
    return out


def resample_volume(volume: Volume, spacing: Sequence[float]) -> Volume:
    """``volume`` on the in-plane grid of ``spacing`` (mm, row then column) over the same
    field of view, with its geometry (spacing) and padding mask to match. The first pixel
    stays where it was (Fourier resampling's sample grid), so the origin does too."""
    shape = working_shape(volume.array.shape[1:], volume.spacing[1:], spacing)
    if shape == volume.array.shape[1:]:
        return volume
    old = np.asarray(volume.spacing[1:], dtype=float)
    new = old * np.asarray(volume.array.shape[1:]) / np.asarray(shape)
    padding = None
    if volume.padding is not None:  # nearest pixel of the same sample grid
        rows, cols = (np.minimum(np.rint(np.arange(m) * n / m).astype(int), n - 1)
                      for m, n in zip(shape, volume.array.shape[1:], strict=True))
        padding = volume.padding[:, rows][:, :, cols]
    return dataclasses.replace(volume, array=resize_slices(volume.array, shape),
                               spacing=(volume.spacing[0], float(new[0]), float(new[1])),
                               padding=padding)
