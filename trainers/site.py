"""``dicomnode train site``: retrain a route's model from the node's own spool.

The route's ``match`` table selects the source series, its ``target`` table the reference
series; a route to a multi-domain model (``target_domain``) selects each domain's series with
its ``[routes.domains.NAME]`` table instead. A share of both is held out; the new model trains
on the rest, then the deployed model and the new one are evaluated side by side on the
held-out series. The new model is written as ``models_dir/<model>-v<version>`` (the next free
minor version); the deployed folder is never touched. Deploying is a one-line config change,
which stays reversible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError
from pipelines.model_folder import ModelInfo, read_model_info
from pipelines.routing import Condition, Route, evaluate, series_values
from pipelines.series import SeriesError, find_series, harmonisable_images, read_headers
from trainers import report
from trainers.data import Series, load_series_dir, pair_series, split_holdout
from trainers.evaluate import evaluate_series
from trainers.evaluate_domains import evaluate_domains
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
    if route.target_domain or options.pairing == "multidomain":
        return _train_site_domains(options, route, spool, models_dir, log)
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
    deployed, options, folder = _new_version(options, route, models_dir,
                                             "plain" if options.pairing == "paired" else "unet")
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
    log(f"training {mode} {options.architecture} as {folder.name} (version {options.version})")
    outcome = MODES[mode].train_series()(options, pick(sources, s_train),
                                         pick(targets, t_train), folder, log)
    held_s, held_t = pick(sources, s_test), pick(targets, t_test)
    if not options.compare:
        return _uncompared(folder, route, outcome, log)
    comparison = _compare(folder, models_dir / route.model if deployed else None, held_s, held_t,
                          log)
    _verdict(folder, route, comparison, f"{len(held_s)} held-out series", log)
    return outcome


def _new_version(options: SiteOptions, route: Route, models_dir: Path, architecture: str
                 ) -> tuple[ModelInfo | None, SiteOptions, Path]:
    """The deployed model (if any), the options completed from it (architecture, parameters,
    pixel spacing; the new version's name), and the new version's folder."""
    try:
        deployed = read_model_info(models_dir / route.model)
    except ModelError:
        deployed = None
    version, folder = next_version(models_dir, route.model, deployed.version if deployed
                                   else None)
    if not options.architecture:
        if deployed is not None:
            options.architecture = deployed.architecture
            # a style generator's own: its style length and domains come from the options
            options.param = {k: v for k, v in deployed.params.items()
                             if k not in ("dims", "style_dim", "domains")}
            options.dims = deployed.dims
            options.style_dim = int(deployed.params.get("style_dim", options.style_dim))
        else:
            options.architecture = architecture
    if not options.pixel_spacing and deployed is not None and deployed.pixel_spacing:
        options.pixel_spacing = deployed.pixel_spacing[0]  # where the deployed one works
    return deployed, dataclasses.replace(options, name=folder.name, version=version,
                                         models_dir=models_dir, force=False), folder


def _uncompared(folder: Path, route: Route, outcome: TrainOutcome, log: Log) -> TrainOutcome:
    log(f"wrote {folder.name}, not compared with the deployed {route.model}; to deploy,"
        f" set model = \"{folder.name}\" in route '{route.name}'")
    return outcome


def _verdict(folder: Path, route: Route, comparison: dict[str, Any], held: str,
             log: Log) -> None:
    report.write_json(folder / "report" / "site-comparison.json", comparison)
    verdict = "better" if comparison["new_is_better"] else "NOT better"
    log(f"{folder.name} is {verdict} than the deployed {route.model} on {held}"
        f" ({comparison['score']}: new {comparison['new_score']:.4g}, deployed"
        f" {comparison.get('deployed_score')}); to deploy, set model = \"{folder.name}\" in"
        f" route '{route.name}'")


def _train_site_domains(options: SiteOptions, route: Route, spool: Path, models_dir: Path,
                        log: Log) -> TrainOutcome:
    """A multi-domain route: each ``[routes.domains.NAME]`` table selects that domain's
    spooled series (a series two tables select is left out); a share of each domain is held
    out, the rest trains a new multi-domain model; both models are compared on every ordered
    pair of the held-out series."""
    if not route.domains:
        raise TrainingError(f"route '{route.name}' has no [routes.domains.NAME] tables: nothing"
                            " says which spooled series belong to which domain")
    if not spool.is_dir():
        raise TrainingError(f"{spool}: no spool folder (has the node received anything?)")
    chosen = {name: _selected(spool, conditions, log) for name, conditions in route.domains}
    everything = {s.uid: s for s in load_series_dir(spool, log)}
    domains: dict[str, list[Series]] = {}
    for name, uids in chosen.items():
        twice = {u for other, o in chosen.items() if other != name for u in uids & o}
        for uid in sorted(twice):
            log(f"series {uid} matches domain {name} and another; left out")
        domains[name] = [everything[u] for u in sorted(uids - twice) if u in everything]
    log(f"route '{route.name}': " + ", ".join(f"{len(v)} {k}" for k, v in domains.items())
        + " series")
    short = {k: len(v) for k, v in domains.items() if len(v) < 3}
    if short:
        raise TrainingError(f"route '{route.name}' needs at least 3 series of every domain in"
                            f" {spool} (train, validate, held-out test); found "
                            + ", ".join(f"{n} {k}" for k, n in short.items()))
    deployed, options, folder = _new_version(options, route, models_dir, "stargan")
    train, held = {}, {}
    for k, (name, series) in enumerate(domains.items()):
        fit_idx, test_idx = split_holdout(len(series), options.holdout, options.seed + 101 + k)
        train[name], held[name] = [series[i] for i in fit_idx], [series[i] for i in test_idx]
    log(f"training multidomain {options.architecture} as {folder.name} (version"
        f" {options.version})")
    outcome = MODES["multidomain"].train_series()(options, train, folder, log)
    if not options.compare:
        return _uncompared(folder, route, outcome, log)
    comparable = deployed is not None and {d.name for d in deployed.styles} >= set(held)
    comparison = _compare_domains(folder, models_dir / route.model if comparable else None,
                                  held, route.target_domain, log)
    _verdict(folder, route, comparison, "every held-out pair", log)
    return outcome


def _domain_score(metrics: dict[str, Any], target: str | None) -> tuple[str, float]:
    """The N-way scanner classifier after converting to the route's target domain (nearer
    chance is better)."""
    accuracy = metrics["scanner_accuracy"]
    value = float(accuracy["after"].get(target or "", min(accuracy["after"].values())))
    return f"scanner_accuracy to {target}", abs(value - accuracy["chance"])


def _compare_domains(new: Path, deployed: Path | None, held: dict[str, list[Series]],
                     target: str | None, log: Log) -> dict[str, Any]:
    new_metrics = evaluate_domains(new, held, log=log)
    key, new_score = _domain_score(new_metrics, target)
    out: dict[str, Any] = {"score": f"{key}: distance from chance", "new": new_metrics,
                           "new_score": new_score,
                           "held_out": {k: [s.uid for s in v] for k, v in held.items()}}
    if deployed is None:
        out.update(deployed=None, deployed_score=None, new_is_better=True)
        return out
    old_metrics = evaluate_domains(deployed, held, log=log)
    old_score = _domain_score(old_metrics, target)[1]
    out.update(deployed=old_metrics, deployed_score=old_score,
               new_is_better=new_score < old_score)
    return out


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
