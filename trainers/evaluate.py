"""``dicomnode evaluate``: the CONTRACT metrics of a model folder on held-out series.

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
* ``baseline``: the same metrics with SimpleITK histogram matching in place of the model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from pipelines.harmonise import ModelCache, harmonise_series
from pipelines.intensity import normalise
from pipelines.model_folder import read_model_info
from pipelines.series import load_series
from trainers import report
from trainers.data import PatchSampler, Series, load_series_dir, normalisation_for, pair_series
from trainers.domain_classifier import balanced_accuracy, train_classifier
from trainers.heldout import HeldOut
from trainers.metrics import metric_unit_name, metric_units
from trainers.radiomics_ccc import class_ccc, roi_corners, roi_features

Log = Callable[[str], None]
PAIRED_KEYS = ("psnr", "ssim", "rmse", "ncc")
ROIS = 64
CLASSIFIER_STEPS = 300
TEST_PATCHES = 128


class EvaluationError(ValueError):
    """The evaluation cannot run on these inputs; the message says why."""


def harmonise_with_node(model_dir: Path, series: Series, workdir: Path) -> np.ndarray:
    """The model's output for ``series`` as the node writes it (real values, same grid)."""
    outcome = harmonise_series(series.files, routes=[], models_dir=model_dir.parent,
                               out_dir=workdir / series.uid, model_name=model_dir.name,
                               cache=ModelCache(1))
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


def mean_metrics(values: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over series (a list of ``image_metrics`` results)."""
    return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def _split(n: int) -> tuple[list[int], list[int]]:
    """Series for classifier training and for testing; one series serves both (by z)."""
    if n < 2:
        return [0], [0]
    half = (n + 1) // 2
    return list(range(half)), list(range(half, n))


def _patches(volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray], patch: int, seed: int,
             count: int) -> torch.Tensor:
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
    s_train, s_test = _split(len(sources))
    t_train, t_test = _split(len(targets))
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
    target_test = _patches([part(prep(targets[i].volume.array), False) for i in t_test],
                           [part(targets[i].mask, False) for i in t_test], size, seed + 2,
                           TEST_PATCHES)
    out = {}
    for label, volumes in candidates.items():
        test = _patches([part(prep(volumes[i]), False) for i in s_test],
                        [part(sources[i].mask, False) for i in s_test], size, seed + 3,
                        TEST_PATCHES)
        out[label] = balanced_accuracy(model, [test, target_test])
    return out


def evaluate_series(model_dir: Path, sources: Sequence[Series], targets: Sequence[Series],
                    report_dir: Path | None = None, seed: int = 0,
                    log: Log = print) -> dict[str, Any]:
    """Every CONTRACT metric for the model in ``model_dir`` on these series."""
    info = read_model_info(model_dir)
    if not sources or not targets:
        raise EvaluationError("need at least one source and one target series")
    modality = sources[0].modality
    log(f"harmonising {len(sources)} source series with {info.name} {info.version}")
    with tempfile.TemporaryDirectory(prefix="dicomnode-eval-") as tmp:
        after = [harmonise_with_node(model_dir, s, Path(tmp)) for s in sources]
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
        size = max(8, min(32, min(m.shape[1] for m in masks) // 8))
        corners = roi_corners(masks, size, ROIS, seed)
        bin_width = 25.0 if modality == "CT" else 0.05
        log(f"radiomics: {len(corners)} ROIs of {size}x{size} px, bin width {bin_width}")
        feats = {k: roi_features(v, corners, size, bin_width) for k, v in rois.items()}
        result["radiomics_ccc"] = class_ccc(feats["after"], feats["target"])
        result["radiomics_ccc_before"] = class_ccc(feats["before"], feats["target"])
        result["radiomics_rois"] = {"count": len(corners), "size_px": size,
                                    "bin_width": bin_width}
        baseline["radiomics_ccc"] = class_ccc(feats["baseline"], feats["target"])
    else:
        for key in (*PAIRED_KEYS, "radiomics_ccc"):
            result[key] = baseline[key] = None
        result["note"] = ("no source/target pairs (FrameOfReferenceUID + slice position):"
                          " paired metrics and radiomics CCC need them")
        for i, s in enumerate(sources):
            held.add_unpaired({k: metric_units(v, modality) for k, v in (
                ("before", s.volume.array), ("after", after[i]), ("baseline", matched[i]))},
                s.mask)
        for t in targets:
            held.add_target(metric_units(t.volume.array, modality), t.mask)
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
             log: Log = print) -> dict[str, Any]:
    """Load the series under ``source`` and ``target`` and evaluate the model on them."""
    for label, path in (("--source", source), ("--target", target)):
        if not Path(path).is_dir():
            raise EvaluationError(f"{label} {path}: not a folder")
    sources, targets = load_series_dir(source, log), load_series_dir(target, log)
    if not sources or not targets:
        raise EvaluationError(f"no loadable DICOM series in"
                              f" {source if not sources else target}")
    return evaluate_series(model_dir, sources, targets, report_dir, log=log)
