"""Preview figure: the same slice of one subject across scanner domains, with differences.

Makes the harmonisation problem visible at a glance: identical anatomy, different scanners.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom


def read_series(paths: list[Path]) -> np.ndarray:
    """Modality values (rescaled) of a written series, (frames, rows, columns)."""
    frames = []
    for path in paths:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float32)
        if "PixelValueTransformationSequence" in ds.get("SharedFunctionalGroupsSequence",
                                                         [{}])[0]:
            t = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
            arr = arr * float(t.RescaleSlope) + float(t.RescaleIntercept)
        elif "RescaleSlope" in ds:
            arr = arr * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        frames.append(arr if arr.ndim == 3 else arr[None])
    return np.concatenate(frames)


def save_preview(series: dict[str, np.ndarray], out: Path, slice_index: int | None = None,
                 modality: str = "CT") -> Path:
    """PNG with one column per domain (top) and its difference to the first domain (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(series)
    first = series[names[0]]
    k = len(first) // 2 if slice_index is None else slice_index
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6.6), squeeze=False)
    for col, name in enumerate(names):
        img = series[name][k]
        vmax = 400.0 if modality == "CT" else float(np.percentile(img, 99.5)) or 1.0
        axes[0, col].imshow(img, cmap="gray", vmin=-1000 if modality == "CT" else 0, vmax=vmax)
        axes[0, col].set_title(name, fontsize=9)
        if modality == "MR":       # vendor scales differ: compare after matching medians
            img = img * np.median(first[k][first[k] > 0]) / max(
                float(np.median(img[img > 0])), 1e-6)
        diff = img - first[k]
        lim = float(np.percentile(np.abs(diff), 99)) or 1.0
        axes[1, col].imshow(diff, cmap="coolwarm", vmin=-lim, vmax=lim)
        axes[1, col].set_title(f"minus {names[0]} (±{lim:.0f})", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
