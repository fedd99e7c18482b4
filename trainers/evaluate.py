"""``dicomnode evaluate``: the metrics of docs/interface.md for a model folder on held-out series.

The harmonised images are produced by the node's own runtime
(:func:`pipelines.harmonise.harmonise_series` writing a derived DICOM series, read back
with :func:`pipelines.series.load_series`), so the numbers include everything the node
does: normalisation, tiling, precision and the stored integer range.

* ``psnr``, ``ssim``, ``rmse``, ``ncc``: paired data only (source and target share a
  FrameOfReferenceUID and slice positions), inside the body mask, ``{"before", "after"}``.
* ``radiomics_ccc``: per pyradiomics feature class, harmonised vs target (paired only);
  ``radiomics_ccc_before`` the same for the unharmonised source.
* ``domain_accuracy``: a scanner classifier trained on unharmonised source vs target,
  its balanced accuracy on harmonised source vs target (0.5 = indistinguishable);
  ``domain_accuracy_before`` on the unharmonised source.
* ``reproducible_share``: the share of radiomic features with CCC >= 0.85 against the target
  (Choe et al. 2019), per feature class and ``overall``, ``{"before", "after"}`` (paired only).
* ``feature_stats``: per feature, Levene and Welch p-values and Cohen's d between the
  (harmonised) source's and the target's ROIs, before and after, and the shares of features
  with |d| < 0.2 and with neither test significant (:mod:`trainers.feature_stats`).
* ``downstream_dice``: a tissue segmentation fitted on the target series only, applied to the
  source before and after, Dice against the simulator's ground truth (:mod:`trainers.tissue`;
  null for series without one).
* ``baseline``: the same metrics with SimpleITK histogram matching in place of the model.

A multi-domain model converts to a ``target_domain``; :func:`evaluate_domains` scores it on
every ordered pair of its domains' series, adds an N-way scanner classifier
(``scanner_accuracy``, 1/N = indistinguishable) and writes one table.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from pipelines.errors import ModelError
from pipelines.harmonise import ModelCache, harmonise_series
from pipelines.intensity import normalise
from pipelines.model_folder import ModelInfo, read_model_info
from pipelines.series import load_series
from trainers import report
from trainers.data import PatchSampler, Series, load_series_dir, normalisation_for, pair_series
from trainers.domain_classifier import balanced_accuracy, train_classifier
from trainers.feature_stats import compare_features
from trainers.feature_stats import summary as feature_summary
from trainers.heldout import HeldOut
from trainers.metrics import metric_unit_name, metric_units
from trainers.radiomics_ccc import (
    REPRODUCIBLE,
    class_ccc,
    feature_ccc,
    reproducible_share,
    roi_corners,
    roi_features,
)
from trainers.tissue import CLASSES as TISSUES
from trainers.tissue import TissueModel, dice, mean_dice, simulated_truth

Log = Callable[[str], None]
PAIRED_KEYS = ("psnr", "ssim", "rmse", "ncc")
ROIS = 64
CLASSIFIER_STEPS = 300
TEST_PATCHES = 128


class EvaluationError(ValueError):
    """The evaluation cannot run on these inputs; the message says why."""


def harmonise_with_node(model_dir: Path, series: Series, workdir: Path,
                        target_domain: str | None = None,
                        cache: ModelCache | None = None) -> np.ndarray:
    """The model's output for ``series`` as the node writes it (real values, same grid)."""
    outcome = harmonise_series(series.files, routes=[], models_dir=model_dir.parent,
                               out_dir=workdir / series.uid, model_name=model_dir.name,
                               cache=cache or ModelCache(1), target_domain=target_domain)
    if outcome.status != "harmonised":
        raise EvaluationError(f"series {series.uid}: {outcome.reason}")
    return load_series(outcome.outputs).array


def histogram_match(volume: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """SimpleITK histogram matching (1024 levels, 7 match points, background excluded)."""
    f = sitk.HistogramMatchingImageFilter()
    f.SetNumberOfHistogramLevels(1024)
    f.SetNumberOfMatchPoints(7)
    f.ThresholdAtMeanIntensityOn()
    out = f.Execute(sitk.GetImageFromArray(volume.astype(np.float32)),
                    sitk.GetImageFromArray(reference.astype(np.float32)))
    return sitk.GetArrayFromImage(out)


def classifier_split(n: int) -> tuple[list[int], list[int]]:
    """Series for classifier training and for testing; one series serves both (by z)."""
    if n < 2:
        return [0], [0]
    half = (n + 1) // 2
    return list(range(half)), list(range(half, n))


def fixed_patches(volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray], patch: int,
                  seed: int, count: int) -> torch.Tensor:
    return PatchSampler(volumes, masks, patch, 2, seed, flip=False).sample(count)[0]


def domain_accuracy(sources: Sequence[Series], targets: Sequence[Series],
                    candidates: dict[str, Sequence[np.ndarray]], modality: str, seed: int,
                    log: Log) -> dict[str, float]:
    """Train a scanner classifier on unharmonised images, test it on each candidate.

    ``candidates`` maps a label to source-domain volumes (real values, one per source
    series): the unharmonised ones, the model's output, the baseline's output. With one
    series per domain, the classifier trains on the lower half of the slices and is
    tested on the upper half.
    """
    norm = normalisation_for(modality)
    prep = (lambda v: normalise(v, norm)[0])  # noqa: E731
    s_train, s_test = classifier_split(len(sources))
    t_train, t_test = classifier_split(len(targets))
    by_z = len(sources) < 2 or len(targets) < 2

    def part(arr: np.ndarray, train: bool) -> np.ndarray:
        if not by_z:
            return arr
        half = arr.shape[0] // 2
        return arr[:half] if train else arr[half:]

    size = min(64, *(min(s.volume.array.shape[1:]) for s in [*sources, *targets]))
    train_sets = [
        PatchSampler([part(prep(sources[i].volume.array), True) for i in s_train],
                     [part(sources[i].mask, True) for i in s_train], size, 2, seed),
        PatchSampler([part(prep(targets[i].volume.array), True) for i in t_train],
                     [part(targets[i].mask, True) for i in t_train], size, 2, seed + 1)]
    log(f"training the scanner classifier ({CLASSIFIER_STEPS} steps, {size}px patches)")
    model = train_classifier(train_sets, steps=CLASSIFIER_STEPS, seed=seed)
    target_test = fixed_patches([part(prep(targets[i].volume.array), False) for i in t_test],
                                [part(targets[i].mask, False) for i in t_test], size,
                                seed + 2, TEST_PATCHES)
    out = {}
    for label, volumes in candidates.items():
        test = fixed_patches([part(prep(volumes[i]), False) for i in s_test],
                             [part(sources[i].mask, False) for i in s_test], size, seed + 3,
                             TEST_PATCHES)
        out[label] = balanced_accuracy(model, [test, target_test])
    return out


def roi_size(masks: Sequence[np.ndarray]) -> int:
    """ROI edge: an eighth of the smallest matrix, 8 to 32 px."""
    return max(8, min(32, min(m.shape[1] for m in masks) // 8))


def bin_width_for(modality: str) -> float:
    """25 HU for CT, 0.05 of the normalised MR range (the radiomics module doc)."""
    return 25.0 if modality == "CT" else 0.05


def _unpaired_features(sources: Sequence[Series], targets: Sequence[Series],
                       candidates: dict[str, Sequence[np.ndarray]], modality: str, seed: int,
                       log: Log) -> dict[str, dict[str, np.ndarray]]:
    """Radiomic features of ROIs drawn in the source series (for every candidate, at the same
    places) and, independently, in the target series: the samples of an unpaired study."""
    size = roi_size([s.mask for s in sources] + [t.mask for t in targets])
    bin_width = bin_width_for(modality)
    corners = roi_corners([s.mask for s in sources], size, ROIS, seed)
    target_corners = roi_corners([t.mask for t in targets], size, ROIS, seed + 1)
    log(f"radiomics (unpaired): {len(corners)} + {len(target_corners)} ROIs of {size}x{size}"
        f" px, bin width {bin_width}")
    feats = {k: roi_features([metric_units(v, modality) for v in volumes], corners, size,
                             bin_width) for k, volumes in candidates.items()}
    feats["target"] = roi_features([metric_units(t.volume.array, modality) for t in targets],
                                   target_corners, size, bin_width)
    return feats


def feature_table(stats: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """``feature_stats``: per feature before and after, and the summary shares of each."""
    summaries = {k: feature_summary(stats[k]) for k in ("before", "after")}
    return {"share_small_d": {k: v["small_d"] for k, v in summaries.items()},
            "levene_not_significant": {k: v["levene_not_significant"]
                                       for k, v in summaries.items()},
            "welch_not_significant": {k: v["welch_not_significant"]
                                      for k, v in summaries.items()},
            "features": {name: {"before": stats["before"][name], "after": stats["after"][name]}
                         for name in stats["after"]}}


def downstream_dice(sources: Sequence[Series], targets: Sequence[Series],
                    candidates: dict[str, Sequence[np.ndarray]], modality: str
                    ) -> dict[str, Any] | None:
    """Tissue Dice of a segmenter fitted on the target series (against their ground truth),
    on each candidate's source volumes; ``target``: on the target series themselves, each
    scored by a segmenter fitted on the others (all of them when there is one). None when a
    series has no ground truth (only the simulator's series have one)."""
    source_truth = [simulated_truth(s) for s in sources]
    target_truth = [simulated_truth(t) for t in targets]
    if any(t is None for t in [*source_truth, *target_truth]) or modality not in TISSUES:
        return None
    classes = TISSUES[modality]
    images = [metric_units(t.volume.array, modality) for t in targets]
    model = TissueModel.fit(images, target_truth)
    out: dict[str, Any] = {"classes": list(classes), "reference": "simulator ground truth",
                           "fitted_on": f"{len(targets)} target series"}
    for name, volumes in candidates.items():
        out[name] = mean_dice([dice(model.predict(metric_units(v, modality), s.mask), truth,
                                    classes)
                               for v, s, truth in zip(volumes, sources, source_truth,
                                                      strict=True)])
    own = []
    for i, t in enumerate(targets):
        others = [k for k in range(len(targets)) if k != i] or [i]
        fitted = TissueModel.fit([images[k] for k in others], [target_truth[k] for k in others])
        own.append(dice(fitted.predict(images[i], t.mask), target_truth[i], classes))
    out["target"] = mean_dice(own)
    return out


def evaluate_series(model_dir: Path, sources: Sequence[Series], targets: Sequence[Series],
                    report_dir: Path | None = None, seed: int = 0, log: Log = print,
                    target_domain: str | None = None) -> dict[str, Any]:
    """Every metric of docs/interface.md for the model in ``model_dir`` on these series (a
    multi-domain model converting to ``target_domain``)."""
    info = read_info(model_dir)
    if not sources or not targets:
        raise EvaluationError("need at least one source and one target series")
    log(f"harmonising {len(sources)} source series with {info.name} {info.version}")
    with tempfile.TemporaryDirectory(prefix="dicomnode-eval-") as tmp:
        after = [harmonise_with_node(model_dir, s, Path(tmp), target_domain) for s in sources]
    return score(info, sources, targets, after, report_dir, seed, log, target_domain)


def read_info(model_dir: Path) -> ModelInfo:
    try:
        return read_model_info(model_dir)
    except ModelError as exc:
        raise EvaluationError(str(exc)) from None


def score(info: ModelInfo, sources: Sequence[Series], targets: Sequence[Series],
          after: Sequence[np.ndarray], report_dir: Path | None = None, seed: int = 0,
          log: Log = print, target_domain: str | None = None) -> dict[str, Any]:
    """The metrics of ``after`` (the model's output for each source series, real values)."""
    modality = sources[0].modality
    pairs = pair_series(sources, targets)
    # reference for histogram matching: a target of another subject when there is one,
    # as a site would have to use (the paired target itself would be an oracle)
    paired_with = {id(p.source): p.target for p in pairs}

    def reference(s: Series) -> Series:
        others = [t for t in targets if t is not paired_with.get(id(s))]
        return others[0] if others else targets[0]

    matched = [histogram_match(s.volume.array, reference(s).volume.array) for s in sources]
    index = {id(s): i for i, s in enumerate(sources)}
    result: dict[str, Any] = {
        "model": info.name, "version": info.version, "weights_sha256": info.weights_sha256,
        **({"target_domain": target_domain} if target_domain else {}),
        "modality": modality, "units": metric_unit_name(modality),
        "data_range": "target max - min inside the body mask",
        "series": {"source": len(sources), "target": len(targets), "pairs": len(pairs)},
        "paired": bool(pairs)}
    baseline: dict[str, Any] = {"method": "SimpleITK histogram matching to a target series"
                                          " of another subject (1024 levels, 7 points)"}
    views: dict[str, list[np.ndarray]] = {"before": [], "after": [], "baseline": [],
                                          "target": []}
    held = HeldOut(views)
    if pairs:
        rois: dict[str, list[np.ndarray]] = {k: [] for k in views}
        masks = []
        for p in pairs:
            i = index[id(p.source)]
            s, t = p.source_slices, p.target_slices
            images = {"before": metric_units(p.source.volume.array, modality)[s],
                      "after": metric_units(after[i], modality)[s],
                      "baseline": metric_units(matched[i], modality)[s],
                      "target": metric_units(p.target.volume.array, modality)[t]}
            mask = p.source.mask[s] | p.target.mask[t]
            held.add_pair(images, mask)
            for k, v in images.items():
                rois[k].append(v)
            masks.append(mask)
            if len(views["before"]) < 3:
                z = len(s) // 2
                for k, v in images.items():
                    views[k].append(v[z])
        result.update(held.versus())
        baseline.update(held.versus(after="baseline"))
        size, bin_width = roi_size(masks), bin_width_for(modality)
        corners = roi_corners(masks, size, ROIS, seed)
        log(f"radiomics: {len(corners)} ROIs of {size}x{size} px, bin width {bin_width}")
        feats = {k: roi_features(v, corners, size, bin_width) for k, v in rois.items()}
        result["radiomics_ccc"] = class_ccc(feats["after"], feats["target"])
        result["radiomics_ccc_before"] = class_ccc(feats["before"], feats["target"])
        result["radiomics_rois"] = {"count": len(corners), "size_px": size,
                                    "bin_width": bin_width}
        baseline["radiomics_ccc"] = class_ccc(feats["baseline"], feats["target"])
        shares = {k: reproducible_share(feature_ccc(feats[k], feats["target"]))
                  for k in ("before", "after", "baseline")}
        result["reproducible_share"] = {"before": shares["before"], "after": shares["after"],
                                        "threshold": REPRODUCIBLE}
        baseline["reproducible_share"] = {"before": shares["before"],
                                          "after": shares["baseline"]}
    else:
        for key in (*PAIRED_KEYS, "radiomics_ccc", "reproducible_share"):
            result[key] = baseline[key] = None
        result["note"] = ("no source/target pairs (FrameOfReferenceUID + slice position):"
                          " paired metrics, radiomics CCC and the reproducible share need them")
        for i, s in enumerate(sources):
            held.add_unpaired({k: metric_units(v, modality) for k, v in (
                ("before", s.volume.array), ("after", after[i]), ("baseline", matched[i]))},
                s.mask)
        for t in targets:
            held.add_target(metric_units(t.volume.array, modality), t.mask)
        feats = _unpaired_features(sources, targets, {"before": [s.volume.array for s in
                                                                 sources],
                                                      "after": after, "baseline": matched},
                                   modality, seed, log)
    stats = {k: compare_features(feats[k], feats["target"]) for k in ("before", "after",
                                                                        "baseline")}
    result["feature_stats"] = feature_table(stats)
    baseline["feature_stats"] = {k: feature_summary(stats[v]) for k, v in
                                 (("before", "before"), ("after", "baseline"))}
    dice = downstream_dice(sources, targets, {"before": [s.volume.array for s in sources],
                                              "after": after, "baseline": matched}, modality)
    result["downstream_dice"] = None if dice is None else {
        k: v for k, v in dice.items() if k != "baseline"}
    baseline["downstream_dice"] = None if dice is None else {"after": dice["baseline"]}
    accuracy = domain_accuracy(sources, targets, {"before": [s.volume.array for s in sources],
                                                  "after": after, "baseline": matched},
                               modality, seed, log)
    result["domain_accuracy"] = accuracy["after"]
    result["domain_accuracy_before"] = accuracy["before"]
    baseline["domain_accuracy"] = accuracy["baseline"]
    result["baseline"] = baseline
    if report_dir is not None:
        _write_report(report_dir, result, views, held.histograms(), modality)
    return result


def _write_report(out: Path, result: dict[str, Any], views: dict[str, list[np.ndarray]],
                  hist: dict[str, np.ndarray], modality: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "metrics.json", result)
    report.plot_histograms(hist, out / "histograms.png", metric_unit_name(modality))
    if views["before"]:
        rows = [[views[k][r] for k in ("before", "after", "baseline", "target")]
                for r in range(len(views["before"]))]
        report.plot_grid(rows, ["before", "after (model)", "histogram matching", "target"],
                         out / "comparison.png", report.display_window(modality, rows[0][-1]))


def evaluate(model_dir: Path, source: Path, target: Path, report_dir: Path | None = None,
             log: Log = print, target_domain: str | None = None) -> dict[str, Any]:
    """Load the series under ``source`` and ``target`` and evaluate the model on them (a
    multi-domain model converting to ``target_domain``)."""
    for label, path in (("--source", source), ("--target", target)):
        if not Path(path).is_dir():
            raise EvaluationError(f"{label} {path}: not a folder")
    sources, targets = load_series_dir(source, log), load_series_dir(target, log)
    if not sources or not targets:
        raise EvaluationError(f"no loadable DICOM series in"
                              f" {source if not sources else target}")
    return evaluate_series(model_dir, sources, targets, report_dir, log=log,
                           target_domain=target_domain)
