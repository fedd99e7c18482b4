"""``dicomnode train site``: retrain a route's model from the node's own spool.

The route's ``match`` table selects the source series, its ``target`` table the reference
series. A share of both is held out; the new model trains on the rest, then the deployed
model and the new one are evaluated side by side on the held-out series. The new model is
written as ``models_dir/<model>-v<version>`` (the next free minor version); the deployed
folder is never touched. Deploying is a one-line config change, which stays reversible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError
from pipelines.model_folder import read_model_info
from pipelines.routing import Condition, Route, evaluate, series_values
from pipelines.series import SeriesError, find_series, harmonisable_images, read_headers
from trainers import report
from trainers.data import Series, load_series_dir, pair_series, split_holdout
from trainers.evaluate import evaluate_series
from trainers.modes import MODES
from trainers.options import SiteOptions
from trainers.train import TrainingError, TrainOutcome

Log = Callable[[str], None]


def _selected(spool: Path, conditions: Sequence[Condition], log: Log) -> set[str]:
    """UIDs of the spooled series whose series-level tags satisfy ``conditions``."""
    keywords = sorted({c.keyword for c in conditions})
    chosen = set()
    for uid, files in find_series(spool).items():
        try:
            values, conflicts = series_values(harmonisable_images(read_headers(files)), keywords)
        except SeriesError as exc:
            log(f"skipping series {uid}: {exc}")
            continue
        ok, _ = evaluate(conditions, values)
        if ok and not conflicts:
            chosen.add(uid)
    return chosen


def next_version(models_dir: Path, model: str, deployed: str | None) -> tuple[str, Path]:
    """The first ``major.minor+k`` after the deployed version whose folder is free."""
    major, _, minor = (deployed or "1.0").partition(".")
    try:
        base, start = int(major), int(minor or 0) + 1
    except ValueError:
        base, start = 1, 1
    for step in range(start, start + 1000):
        version = f"{base}.{step}"
        folder = models_dir / f"{model}-v{version}"
        if not folder.exists():
            return version, folder
    raise TrainingError(f"no free version folder for {model} under {models_dir}")


def _score(metrics: dict[str, Any]) -> tuple[str, float, bool]:
    """The headline number deciding 'better': PSNR with pairs, else domain accuracy."""
    if metrics.get("psnr"):
        return "psnr", float(metrics["psnr"]["after"]), True
    return "domain_accuracy", float(metrics["domain_accuracy"]), False


def train_site(options: SiteOptions, routes: Sequence[Route], spool: Path, models_dir: Path,
               log: Log = print) -> TrainOutcome:
    """Select, split, train, compare with the deployed model, write a new version."""
    route = next((r for r in routes if r.name == options.route), None)
    if route is None:
        raise TrainingError(f"no route named '{options.route}' (known: "
                            f"{', '.join(r.name for r in routes) or 'none'})")
    if not route.target:
        raise TrainingError(f"route '{route.name}' has no [routes.target] table: nothing says"
                            " which series are the reference")
    if not spool.is_dir():
        raise TrainingError(f"{spool}: no spool folder (has the node received anything?)")
    source_uids = _selected(spool, route.match, log)
    target_uids = _selected(spool, route.target, log) - source_uids
    everything = {s.uid: s for s in load_series_dir(spool, log)}
    sources = [everything[u] for u in sorted(source_uids) if u in everything]
    targets = [everything[u] for u in sorted(target_uids) if u in everything]
    log(f"route '{route.name}': {len(sources)} source and {len(targets)} target series")
    if len(sources) < 3 or len(targets) < 3:
        raise TrainingError(f"route '{route.name}' needs at least 3 source and 3 target series"
                            f" in {spool} (train, validate, held-out test); found"
                            f" {len(sources)} and {len(targets)}")
    deployed_dir = models_dir / route.model
    try:
        deployed = read_model_info(deployed_dir)
    except ModelError:
        deployed = None
    version, folder = next_version(models_dir, route.model, deployed.version if deployed
                                   else None)
    if not options.architecture:
        if deployed is not None:
            options.architecture = deployed.architecture
            options.param = {k: v for k, v in deployed.params.items() if k != "dims"}
            options.dims = deployed.dims
        else:
            options.architecture = "plain" if options.pairing == "paired" else "unet"
    if not options.pixel_spacing and deployed is not None and deployed.pixel_spacing:
        options.pixel_spacing = deployed.pixel_spacing[0]  # where the deployed one works
    options = dataclasses.replace(options, name=folder.name, version=version,
                                  models_dir=models_dir, force=False)
    s_train, s_test = split_holdout(len(sources), options.holdout, options.seed + 101)
    held_frames = {sources[i].frame_of_reference for i in s_test}
    t_test = [i for i, t in enumerate(targets) if t.frame_of_reference in held_frames]
    if t_test:  # paired data: hold out the same subjects on both sides
        t_train = [i for i in range(len(targets)) if i not in t_test]
    else:
        t_train, t_test = split_holdout(len(targets), options.holdout, options.seed + 102)
    pick = (lambda items, idx: [items[i] for i in idx])  # noqa: E731
    mode = options.pairing
    if mode == "auto":
        deployed_mode = deployed.training.get("mode") if deployed else None
        mode = "paired" if len(pair_series(pick(sources, s_train), pick(targets, t_train),
                                           options.tolerance)) >= 2 \
            else "synthetic" if deployed_mode == "synthetic" else "unpaired"
    log(f"training {mode} {options.architecture} as {folder.name} (version {version})")
    outcome = MODES[mode].train_series()(options, pick(sources, s_train), pick(targets, t_train),
                                 folder, log)
    held_s, held_t = pick(sources, s_test), pick(targets, t_test)
    comparison = _compare(folder, deployed_dir if deployed else None, held_s, held_t, log)
    report.write_json(folder / "report" / "site-comparison.json", comparison)
    verdict = "better" if comparison["new_is_better"] else "NOT better"
    log(f"{folder.name} is {verdict} than the deployed {route.model} on"
        f" {len(held_s)} held-out series ({comparison['score']}: new"
        f" {comparison['new_score']:.4g}, deployed {comparison.get('deployed_score')}); to"
        f" deploy, set model = \"{folder.name}\" in route '{route.name}'")
    return outcome


def _compare(new: Path, deployed: Path | None, sources: list[Series], targets: list[Series],
             log: Log) -> dict[str, Any]:
    new_metrics = evaluate_series(new, sources, targets, log=log)
    key, new_score, higher = _score(new_metrics)
    out: dict[str, Any] = {"score": key, "new": new_metrics, "new_score": new_score,
                           "held_out": {"source": [s.uid for s in sources],
                                        "target": [t.uid for t in targets]}}
    if deployed is None:
        out.update(deployed=None, deployed_score=None, new_is_better=True)
        return out
    old_metrics = evaluate_series(deployed, sources, targets, log=log)
    old_score = _score(old_metrics)[1]
    better = new_score > old_score if higher else abs(new_score - 0.5) < abs(old_score - 0.5)
    out.update(deployed=old_metrics, deployed_score=old_score, new_is_better=better)
    return out
