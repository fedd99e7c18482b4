"""Training and evaluation reports: PNG figures and a metrics.json, small enough to commit.

Figures are what a site physicist looks at before deploying: loss curves (did it converge,
did validation peak), before / after / target slices in a clinical window, and intensity
histograms inside the body (did the distribution move onto the target's).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402


def display_window(modality: str, reference: np.ndarray) -> tuple[float, float]:
    """CT: soft-tissue window (W 400, L 40 HU); MR: the reference's 1-99th percentiles."""
    if modality.upper() == "CT":
        return -160.0, 240.0
    lo, hi = np.percentile(reference, [1, 99])
    return float(lo), float(hi)


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    if len(values) < width * 2:
        return values
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def plot_losses(history: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> None:
    """Training losses (moving average) on the left, validation metrics on the right."""
    train = {k: v for k, v in history.items() if not k.startswith("val_") and v}
    val = {k[4:]: v for k, v in history.items() if k.startswith("val_") and v}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in train.items():
        steps, values = np.array(points).T
        smooth = _smooth(values, max(1, len(values) // 50))
        axes[0].plot(steps[len(steps) - len(smooth):], smooth, label=name)
    axes[0].set(xlabel="step", ylabel="loss (moving average)", yscale="log", title="training")
    for name, points in val.items():
        steps, values = np.array(points).T
        axes[1].plot(steps, values, marker="o", ms=3, label=name)
    axes[1].set(xlabel="step", title="validation (held-out series)")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], path: Path,
              window: tuple[float, float], labels: Sequence[str] = ()) -> None:
    """One row per slice, one column per image kind (e.g. before, after, target)."""
    cols = len(titles)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 3.2 * len(rows)),
                             squeeze=False)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
        if labels:
            axes[r][0].set_ylabel(labels[r], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_histograms(values: Mapping[str, np.ndarray], path: Path, unit: str) -> None:
    """Intensity histograms (inside the body) of each image kind on one axis."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
    lo, hi = np.percentile(finite, [0.5, 99.5])
    bins = np.linspace(lo, hi, 120)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in values.items():
        ax.hist(v, bins=bins, histtype="step", density=True, label=name, linewidth=1.3)
    ax.set(xlabel=unit, ylabel="density", title="intensity inside the body mask")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def json_ready(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than invalid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_ready(obj.item())
    return obj


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(json_ready(data), indent=2) + "\n")


def write_history(path: Path, history: Mapping[str, Sequence[tuple[int, float]]]) -> None:
    """Loss curves as CSV (name, step, value): small, diffable, re-plottable."""
    with path.open("w") as fh:
        fh.write("name,step,value\n")
        for name, points in history.items():
            fh.writelines(f"{name},{s},{v:.6g}\n" for s, v in points)
