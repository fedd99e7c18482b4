"""``dicomnode evaluate --domain NAME=DIR ...``: a multi-domain model on every ordered pair.

Every series of every named domain is converted by the node's runtime to every other domain
(:func:`trainers.evaluate.harmonise_with_node`), and each ordered pair ``a -> b`` is scored
with all of :func:`trainers.evaluate.score`'s metrics (``a``'s series against ``b``'s). Beside
the pairs, for each target domain, an **N-way scanner classifier** trained on the images a
study would pool after harmonising to it (the target's own series as acquired, every other
domain's converted) tells which scanner each held-out image came from:
``scanner_accuracy.after[b]``; 1/N is indistinguishable (``before``: the same classifier on
the series as acquired).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.harmonise import ModelCache
from pipelines.intensity import normalise
from trainers import evaluate as single
from trainers import report
from trainers.data import PatchSampler, Series, load_series_dir, normalisation_for
from trainers.domain_classifier import balanced_accuracy, train_classifier
from trainers.evaluate import (
    EvaluationError,
    Log,
    classifier_split,
    fixed_patches,
    harmonise_with_node,
    read_info,
    score,
)
from trainers.metrics import metric_units

PAIR = "{} -> {}"


def scanner_accuracy(volumes: Sequence[Sequence[np.ndarray]], series: Sequence[Sequence[Series]],
                     modality: str, seed: int, log: Log) -> float:
    """Balanced accuracy of an N-way classifier telling the scanner of held-out patches:
    ``volumes[k]`` are scanner ``k``'s volumes (real values; harmonised or not), trained on
    the first half of each scanner's series and tested on the rest (by slices with one)."""
    norm = normalisation_for(modality)
    size = min(64, *(min(v.shape[1:]) for vs in volumes for v in vs))
    train, test = [], []
    for k, (vs, ss) in enumerate(zip(volumes, series, strict=True)):
        prep = [normalise(v, norm)[0] for v in vs]
        masks = [s.mask for s in ss]
        fit_idx, test_idx = classifier_split(len(vs))
        if len(vs) < 2:  # one series: lower half of the slices to train, upper to test
            half = prep[0].shape[0] // 2
            prep, masks = [prep[0][:half], prep[0][half:]], [masks[0][:half], masks[0][half:]]
            fit_idx, test_idx = [0], [1]
        train.append(PatchSampler([prep[i] for i in fit_idx], [masks[i] for i in fit_idx],
                                  size, 2, seed + k))
        test.append(fixed_patches([prep[i] for i in test_idx], [masks[i] for i in test_idx],
                                  size, seed + 100 + k, single.TEST_PATCHES))
    log(f"training a {len(volumes)}-way scanner classifier ({single.CLASSIFIER_STEPS} steps)")
    model = train_classifier(train, steps=single.CLASSIFIER_STEPS, seed=seed)
    return balanced_accuracy(model, test)


def evaluate_domains(model_dir: Path, domains: Mapping[str, Sequence[Series]],
                     report_dir: Path | None = None, seed: int = 0,
                     log: Log = print) -> dict[str, Any]:
    """Every ordered pair of ``domains`` (name -> its series), the N-way classifier, one
    table; the names must be domains of the multi-domain model in ``model_dir``."""
    info = read_info(model_dir)
    known = [d.name for d in info.styles]
    if not info.multidomain:
        raise EvaluationError(f"model '{info.name}' is not multi-domain ({info.domains}); use"
                              " --source and --target")
    unknown = [n for n in domains if n not in known]
    if unknown or len(domains) < 2:
        raise EvaluationError(f"--domain must name at least two of the model's domains"
                              f" ({', '.join(known)}); got {', '.join(domains) or 'none'}")
    names = list(domains)
    modality = domains[names[0]][0].modality
    cache = ModelCache(1)
    converted: dict[tuple[str, str], list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="dicomnode-eval-") as tmp:
        for a in names:
            for b in names:
                if a != b:
                    log(f"harmonising {len(domains[a])} {a} series to {b}")
                    converted[(a, b)] = [harmonise_with_node(model_dir, s, Path(tmp) / b, b,
                                                             cache) for s in domains[a]]
    pairs = {}
    for (a, b), after in converted.items():
        log(f"scoring {PAIR.format(a, b)}")
        pairs[PAIR.format(a, b)] = score(info, domains[a], domains[b], after, None, seed, log,
                                         target_domain=b)
    as_acquired = [[s.volume.array for s in domains[n]] for n in names]
    series = [domains[n] for n in names]
    accuracy = {"chance": 1.0 / len(names),
                "before": scanner_accuracy(as_acquired, series, modality, seed, log),
                "after": {b: scanner_accuracy([as_acquired[k] if a == b else converted[(a, b)]
                                               for k, a in enumerate(names)], series, modality,
                                              seed, log) for b in names}}
    result = {"model": info.name, "version": info.version,
              "weights_sha256": info.weights_sha256, "modality": modality,
              "domains": names, "series": {n: len(domains[n]) for n in names},
              "scanner_accuracy": accuracy, "pairs": pairs}
    result["table"] = table_rows(result)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        report.write_json(report_dir / "metrics.json", result)
        (report_dir / "table.md").write_text(markdown(result) + "\n")
        _figures(report_dir, domains, converted, modality)
    return result


def _figures(out: Path, domains: Mapping[str, Sequence[Series]],
             converted: Mapping[tuple[str, str], list[np.ndarray]], modality: str) -> None:
    """Per target domain: each other domain's first series (middle slice) as acquired and
    converted, beside the target's own first series."""
    names = list(domains)
    for b in names:
        target = metric_units(domains[b][0].volume.array, modality)
        rows, labels = [], []
        for a in names:
            if a == b:
                continue
            z = len(domains[a][0].volume.array) // 2
            rows.append([metric_units(domains[a][0].volume.array, modality)[z],
                         metric_units(converted[(a, b)][0], modality)[z],
                         target[min(z, len(target) - 1)]])
            labels.append(a)
        report.plot_grid(rows, ["as acquired", f"to {b}", f"{b} (first series)"],
                         out / f"to-{b}.png", report.display_window(modality, rows[0][-1]),
                         labels=labels)


def _get(metrics: Mapping[str, Any], *path: str) -> float | None:
    value: Any = metrics
    for key in path:
        if not isinstance(value, Mapping) or value.get(key) is None:
            return None
        value = value[key]
    return float(value)


def table_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per ordered pair: each headline figure before, after and for histogram
    matching, the target's own Dice and the two-way classifier."""
    rows = []
    for pair, m in result["pairs"].items():
        base = m["baseline"]
        row: dict[str, Any] = {"pair": pair}
        row["ssim"] = [_get(m, "ssim", "before"), _get(m, "ssim", "after"),
                       _get(base, "ssim", "after")]
        row["psnr"] = [_get(m, "psnr", "before"), _get(m, "psnr", "after"),
                       _get(base, "psnr", "after")]
        row["reproducible_share"] = [_get(m, "reproducible_share", "before", "overall"),
                                     _get(m, "reproducible_share", "after", "overall"),
                                     _get(base, "reproducible_share", "after", "overall")]
        row["share_small_d"] = [_get(m, "feature_stats", "share_small_d", "before"),
                                _get(m, "feature_stats", "share_small_d", "after"),
                                _get(base, "feature_stats", "after", "small_d")]
        row["dice"] = [_get(m, "downstream_dice", "before", "mean"),
                       _get(m, "downstream_dice", "after", "mean"),
                       _get(base, "downstream_dice", "after", "mean")]
        row["dice_target"] = _get(m, "downstream_dice", "target", "mean")
        row["domain_accuracy"] = [m["domain_accuracy_before"], m["domain_accuracy"],
                                  base["domain_accuracy"]]
        rows.append(row)
    return rows


def _cell(values: Sequence[float | None], digits: int) -> str:
    before, after, baseline = (("—" if v is None else f"{v:.{digits}f}") for v in values)
    return f"{before} → **{after}** ({baseline})"


def markdown(result: Mapping[str, Any]) -> str:
    """The table: ``before → **after** (histogram matching)`` per pair and figure."""
    lines = ["| pair | SSIM | PSNR (dB) | reproducible features | features |d|<0.2 | tissue"
             " Dice (target's own) | 2-way accuracy |", "|---|---|---|---|---|---|---|"]
    for row in result["table"]:
        target = "—" if row["dice_target"] is None else f"{row['dice_target']:.3f}"
        lines.append(f"| {row['pair']} | {_cell(row['ssim'], 3)} | {_cell(row['psnr'], 1)}"
                     f" | {_cell(row['reproducible_share'], 2)}"
                     f" | {_cell(row['share_small_d'], 2)} | {_cell(row['dice'], 3)} ({target})"
                     f" | {_cell(row['domain_accuracy'], 2)} |")
    acc = result["scanner_accuracy"]
    lines += ["", f"{len(result['domains'])}-way scanner classifier (chance"
              f" {acc['chance']:.2f}): as acquired {acc['before']:.2f}; after harmonising to "
              + ", ".join(f"{b} {v:.2f}" for b, v in acc["after"].items())]
    return "\n".join(lines)


def evaluate_folders(model_dir: Path, folders: Mapping[str, Any],
                     report_dir: Path | None = None, log: Log = print) -> dict[str, Any]:
    """Load each ``--domain NAME=DIR`` and evaluate the model on every ordered pair."""
    domains = {}
    for name, folder in folders.items():
        path = Path(str(folder))
        if not path.is_dir():
            raise EvaluationError(f"--domain {name}={folder}: not a folder")
        domains[name] = load_series_dir(path, log)
        if not domains[name]:
            raise EvaluationError(f"--domain {name}={folder}: no loadable DICOM series")
    return evaluate_domains(model_dir, domains, report_dir, log=log)
