"""The held-out before/after comparison that training reports and ``evaluate`` share.

Images come in metric units (:func:`trainers.metrics.metric_units`), one dict per held-out
series: the candidates (``before``, ``after``, ``baseline``...) and ``target``. A paired
series (same grid, one body mask) scores every candidate against its target with
:func:`trainers.metrics.image_metrics`; an unpaired one only feeds the histograms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from trainers.metrics import data_range, image_metrics

TARGET = "target"


def mean_metrics(values: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over series (a list of ``image_metrics`` results)."""
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


class HeldOut:
    """Metrics and intensity samples of held-out series, gathered one series at a time."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = [*names]
        self.metrics: dict[str, list[dict[str, float]]] = {
            n: [] for n in self.names if n != TARGET}
        self.samples: dict[str, list[np.ndarray]] = {n: [] for n in self.names}

    def add_pair(self, images: Mapping[str, np.ndarray], mask: np.ndarray) -> None:
        """A paired series: every candidate against ``images["target"]`` inside ``mask``
        (PSNR and SSIM over the target's range inside the mask)."""
        target = images[TARGET]
        peak = data_range(target, mask)
        for name, image in images.items():
            if name != TARGET:
                self.metrics[name].append(image_metrics(image, target, mask, peak))
            self.samples[name].append(image[mask])

    def add_unpaired(self, images: Mapping[str, np.ndarray], mask: np.ndarray) -> None:
        """Candidates of an unpaired series, inside its body ``mask``: histograms only."""
        for name, image in images.items():
            self.samples[name].append(image[mask])

    def add_target(self, target: np.ndarray, mask: np.ndarray) -> None:
        """A target series of another subject (unpaired), inside its own body ``mask``."""
        self.samples[TARGET].append(target[mask])

    def means(self, name: str) -> dict[str, float]:
        """Mean metrics of one candidate over the paired series."""
        return mean_metrics(self.metrics[name])

    def versus(self, before: str = "before", after: str = "after") -> dict[str, dict[str, float]]:
        """``{metric: {"before": mean, "after": mean}}`` of two candidates."""
        b, a = self.means(before), self.means(after)
        return {k: {"before": b[k], "after": a[k]} for k in b}

    def histograms(self) -> dict[str, np.ndarray]:
        """Every candidate's (and the target's) samples, concatenated."""
        return {k: np.concatenate(v) for k, v in self.samples.items() if v}
