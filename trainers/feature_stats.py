"""Feature distributions across domains: what a multi-centre radiomics study tests.

As the CHAIMELEON report does per radiomic feature between sites: Levene's test (equal
spread; Brown-Forsythe, centred on the median), Welch's t-test (equal means, unequal
variances) and Cohen's d (the mean difference in pooled standard deviations). The samples are
unpaired: ROIs of the (harmonised) source scanner's series and of the target scanner's. A
feature with |d| < 0.2 ("small", Cohen) can be pooled across the two scanners.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
from scipy import stats

SMALL_D = 0.2


def cohen_d(x: np.ndarray, y: np.ndarray) -> float:
    """(mean x - mean y) / pooled standard deviation; 0 for two identical constants, NaN for
    two different ones."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    nx, ny = len(x), len(y)
    pooled = math.sqrt(((nx - 1) * x.var(ddof=1) + (ny - 1) * y.var(ddof=1)) / (nx + ny - 2))
    diff = float(x.mean() - y.mean())
    if pooled == 0:
        return 0.0 if diff == 0 else float("nan")
    return diff / pooled


def compare_features(test: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray]
                     ) -> dict[str, dict[str, float]]:
    """Per feature: Levene and Welch p-values and Cohen's d of ``test`` against ``target``."""
    out = {}
    for name, y in target.items():
        x = test[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant features: scipy warns and gives NaN
            levene = float(stats.levene(x, y, center="median").pvalue)
            welch = float(stats.ttest_ind(x, y, equal_var=False).pvalue)
        out[name] = {"levene_p": levene, "welch_p": welch, "cohen_d": cohen_d(x, y)}
    return out


def summary(per_feature: Mapping[str, Mapping[str, float]], alpha: float = 0.05
            ) -> dict[str, float]:
    """Shares over the features: |d| < 0.2, and Levene / Welch not significant at ``alpha``
    (features whose statistic is undefined, e.g. constant in both, are not counted)."""
    def share(values: list[bool]) -> float:
        return float(np.mean(values)) if values else float("nan")

    d = [abs(v["cohen_d"]) < SMALL_D for v in per_feature.values()
         if math.isfinite(v["cohen_d"])]
    return {"small_d": share(d),
            "levene_not_significant": share([v["levene_p"] >= alpha for v in
                                             per_feature.values() if math.isfinite(v["levene_p"])]),
            "welch_not_significant": share([v["welch_p"] >= alpha for v in
                                            per_feature.values() if math.isfinite(v["welch_p"])])}
