"""From DICOM folders to a model folder and its report: what ``dicomnode train`` runs.

Loading, pairing and splitting live in :mod:`trainers.data`, the optimisation in
:mod:`trainers.loop` with a mode's step (:mod:`trainers.paired`, :mod:`trainers.unpaired`);
this module wires them together and writes ``models_dir/NAME`` (docs/model-folder.md)
with ``report/`` inside it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.harmonise import translate_volume
from pipelines.inference import InferenceSettings
from pipelines.intensity import Normalisation, normalise
from pipelines.model_folder import LoadedModel, load_model_folder, save_model_folder
from pipelines.networks import build_generator, count_parameters
from trainers import report
from trainers.data import (
    PatchSampler,
    Series,
    at_pixel_spacing,
    load_series_dir,
    normalisation_for,
    pair_series,
    split_holdout,
)
from trainers.distil import teacher_note, teacher_targets
from trainers.domain_classifier import train_classifier
from trainers.heldout import HeldOut
from trainers.loop import FitResult, fit, seed_everything, select_device
from trainers.metrics import metric_unit_name, metric_units
from trainers.options import (
    CommonOptions,
    MultiDomainOptions,
    PairedOptions,
    UnpairedOptions,
    summary,
)
from trainers.paired import PairedData, generator_params, paired_step
from trainers.unpaired import UnpairedData, unpaired_step

Log = Callable[[str], None]
REPORT_SLICES = 3
FEATURE_NET = {"architecture": "DomainClassifier", "features": 16}


class TrainingError(ValueError):
    """A problem with the training request or its data, phrased for the user."""


@dataclass(frozen=True)
class TrainOutcome:
    folder: Path
    best: dict[str, float]
    result: FitResult
    heldout: dict[str, Any]


def check_output(options: CommonOptions) -> Path:
    """The model folder to write: a plain ``--name``, not there yet unless ``--force``."""
    if not options.name or "/" in options.name or options.name.startswith("."):
        raise TrainingError(f"--name must be a plain folder name, got {options.name!r}")
    folder = options.models_dir / options.name
    if folder.exists() and not options.force:
        raise TrainingError(f"{folder} exists; choose another --name, or --force to replace it")
    return folder


def load_domain(path: Path, label: str, log: Log) -> list[Series]:
    series = load_series_dir(path, log)
    if not series:
        raise TrainingError(f"{label} {path}: no loadable DICOM series")
    modalities = {s.modality for s in series}
    if len(modalities) > 1:
        raise TrainingError(f"{label} {path}: mixed modalities {sorted(modalities)}")
    return series


def describe_domain(name: str, series: Sequence[Series]) -> dict[str, Any]:
    tags = series[0].describe()
    default = " ".join(str(tags[k]) for k in ("Manufacturer", "ConvolutionKernel",
                                                "MagneticFieldStrength") if k in tags)
    return {"name": name or default, **{k: v for k, v in tags.items()
                                         if k != "SeriesDescription"}}


def harmonise_array(generator: nn.Module, volume: np.ndarray, norm: Normalisation, dims: int,
                    device: torch.device) -> np.ndarray:
    """Real values in, real values out, exactly as the node's runtime does it (on series
    already at the model's pixel spacing: see :func:`at_pixel_spacing`)."""
    settings = InferenceSettings(device=device.type, batch_size=4, bf16=False)
    return translate_volume(generator, volume, norm, dims, settings)[0]


def _report_slices(depth: int) -> list[int]:
    return sorted({int(round(f * (depth - 1))) for f in (0.3, 0.5, 0.7)})[:REPORT_SLICES]


def _save(options: CommonOptions, folder: Path, result: FitResult, modality: str,
          sources: Sequence[Series], targets: Sequence[Series], extra: dict[str, Any],
          log: Log, teacher: LoadedModel | None = None) -> nn.Module:
    params = generator_params(options)
    generator = build_generator(options.architecture, params)
    generator.load_state_dict(result.generator_state)
    generator.eval()
    if folder.exists():
        shutil.rmtree(folder)
    training = {"mode": type(options).__name__.removesuffix("Options").lower(),
                "options": summary(options), "steps": result.steps,
                "seconds": round(result.seconds, 1), "stopped_by": result.stopped,
                "best_step": result.best_step, "parameters": count_parameters(generator),
                "source_series": len(sources), "target_series": len(targets), **extra}
    save_model_folder(folder, generator, name=options.name, version=options.version,
                      architecture=options.architecture, params=params,
                      source=describe_domain(options.source_domain, sources),
                      target=teacher.info.target if teacher else
                      describe_domain(options.target_domain, targets),
                      normalisation=normalisation_for(modality).to_spec(), training=training,
                      validation={"best": result.best, "step": result.best_step},
                      pixel_spacing=(options.pixel_spacing,) * 2 if options.pixel_spacing
                      else None, grain=teacher.info.grain if teacher else None)
    log(f"wrote {folder} (best validation at step {result.best_step}: "
        + ", ".join(f"{k}={v:.4g}" for k, v in result.best.items()) + ")")
    return generator


def _write_report(folder: Path, result: FitResult, modality: str,
                  rows: list[list[np.ndarray]], titles: list[str],
                  hist: dict[str, np.ndarray], metrics: dict[str, Any]) -> None:
    out = folder / "report"
    out.mkdir(exist_ok=True)
    report.plot_losses(result.history, out / "losses.png")
    report.write_history(out / "history.csv", result.history)
    window = report.display_window(modality, rows[0][-1])
    report.plot_grid(rows, titles, out / "comparison.png", window)
    report.plot_histograms(hist, out / "histograms.png", metric_unit_name(modality))
    report.write_json(out / "metrics.json", metrics)


def train_folders(options: CommonOptions, train_series: Callable[..., TrainOutcome],
                  log: Log = print) -> TrainOutcome:
    """Check the output folder, load ``--source`` and ``--target`` (multi-domain: every
    ``--domain``), run one mode's ``train_*_series`` (``train site`` selects its series
    itself)."""
    folder = check_output(options)
    if isinstance(options, MultiDomainOptions):
        return train_series(options, load_domains(options.domain, log), folder, log)
    for label, path in (("--source", options.source), ("--target", options.target)):
        if label == "--target" and path is None and getattr(options, "teacher", None):
            continue  # distillation: the teacher makes the targets
        if path is None or not Path(path).is_dir():
            raise TrainingError(f"{label} {path}: not a folder")
    sources = load_domain(options.source, "--source", log)
    if options.target is None:  # distillation (allowed only then, above)
        return train_series(options, sources, [], folder, log)
    targets = load_domain(options.target, "--target", log)
    if targets[0].modality != sources[0].modality:
        raise TrainingError(f"source is {sources[0].modality} but target is"
                            f" {targets[0].modality}")
    return train_series(options, sources, targets, folder, log)


def load_domains(folders: Mapping[str, Any], log: Log) -> dict[str, list[Series]]:
    """The series of every ``--domain NAME=DIR``: at least two domains, one modality."""
    if len(folders) < 2:
        raise TrainingError("multi-domain training needs at least two --domain NAME=DIR")
    domains = {}
    for name, folder in folders.items():
        if not Path(str(folder)).is_dir():
            raise TrainingError(f"--domain {name}={folder}: not a folder")
        domains[name] = load_domain(Path(str(folder)), f"--domain {name}", log)
    modalities = {s[0].modality for s in domains.values()}
    if len(modalities) > 1:
        raise TrainingError(f"the domains mix modalities {sorted(modalities)}")
    return domains


def train_paired_series(options: PairedOptions, sources: Sequence[Series],
                        targets: Sequence[Series], folder: Path,
                        log: Log = print) -> TrainOutcome:
    """Paired training on already loaded series (``train site`` selects them itself); with
    ``options.teacher``, distillation: the targets are the teacher's outputs on the sources
    (:mod:`trainers.distil`)."""
    sources, targets = (at_pixel_spacing(s, options.pixel_spacing) for s in (sources, targets))
    teacher = load_model_folder(options.teacher) if options.teacher else None
    if teacher is not None:
        expected = str(teacher.info.source.get("Modality") or sources[0].modality).upper()
        if expected != sources[0].modality:
            raise TrainingError(f"--teacher {options.teacher} is for {expected}, --source is"
                                f" {sources[0].modality}")
        log(f"distilling {teacher.info.name} {teacher.info.version}: its outputs on"
            f" {len(sources)} source series are the targets")
        targets = teacher_targets(teacher, sources)
    pairs = pair_series(sources, targets, options.tolerance)
    if len(pairs) < 2:
        raise TrainingError(f"found {len(pairs)} source/target pair(s) sharing a"
                            " FrameOfReferenceUID, image grid and slice positions; paired"
                            " training needs at least 2 (use 'train unpaired' otherwise)")
    modality = pairs[0].source.modality
    norm = normalisation_for(modality)
    arrays = []
    for p in pairs:
        src = normalise(p.source.volume.array, norm)[0][p.source_slices]
        tgt = normalise(p.target.volume.array, norm)[0][p.target_slices]
        mask = p.source.mask[p.source_slices] | p.target.mask[p.target_slices]
        arrays.append((src, tgt, mask))
    train_idx, val_idx = split_holdout(len(pairs), options.holdout, options.seed)
    log(f"{len(pairs)} pairs: {len(train_idx)} for training, {len(val_idx)} held out")
    pick = (lambda idx, k: [arrays[i][k] for i in idx])  # noqa: E731 - local shorthand
    data = PairedData(pick(train_idx, 0), pick(train_idx, 1), pick(train_idx, 2),
                      pick(val_idx, 0), pick(val_idx, 1), pick(val_idx, 2))
    seed_everything(options.seed)
    device = select_device(options.device)
    result = fit(paired_step(data, options, device), options, log)
    extra = {"pairs": len(pairs), **({"teacher": teacher_note(teacher)} if teacher else {})}
    generator = _save(options, folder, result, modality, [p.source for p in pairs],
                      [p.target for p in pairs], extra, log, teacher)
    rows: list[list[np.ndarray]] = []
    held = HeldOut(("before", "after", "target"))
    for i in val_idx:
        p = pairs[i]
        raw = p.source.volume.array[p.source_slices]
        images = {"before": metric_units(raw, modality),
                  "after": metric_units(harmonise_array(generator, raw, norm, options.dims,
                                                        device), modality),
                  "target": metric_units(p.target.volume.array[p.target_slices], modality)}
        held.add_pair(images, arrays[i][2])
        if len(rows) < REPORT_SLICES:
            rows += [[images[k][z] for k in images]
                     for z in _report_slices(len(images["before"]))]
    heldout = held.versus()
    _write_report(folder, result, modality, rows[:REPORT_SLICES],
                  ["before (source)", "after (harmonised)", "target"], held.histograms(),
                  {"heldout": heldout, "validation_best": result.best,
                   "best_step": result.best_step, "steps": result.steps,
                   "seconds": result.seconds, "data_range": "target max - min inside the mask"})
    return TrainOutcome(folder, result.best, result, heldout)


def train_unpaired_series(options: UnpairedOptions, sources: Sequence[Series],
                          targets: Sequence[Series], folder: Path,
                          log: Log = print) -> TrainOutcome:
    """CycleGAN on already loaded series (``train site`` selects them from the spool)."""
    sources, targets = (at_pixel_spacing(s, options.pixel_spacing) for s in (sources, targets))
    modality = sources[0].modality
    norm = normalisation_for(modality)
    try:
        s_train, s_val = split_holdout(len(sources), options.holdout, options.seed)
        t_train, t_val = split_holdout(len(targets), options.holdout, options.seed + 1)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    log(f"source: {len(s_train)} series for training, {len(s_val)} held out; target:"
        f" {len(t_train)} / {len(t_val)}")
    src = [normalise(s.volume.array, norm)[0] for s in sources]
    tgt = [normalise(t.volume.array, norm)[0] for t in targets]
    data = UnpairedData([src[i] for i in s_train], [sources[i].mask for i in s_train],
                        [tgt[i] for i in t_train], [targets[i].mask for i in t_train],
                        [src[i] for i in s_val], [sources[i].mask for i in s_val],
                        [tgt[i] for i in t_val], [targets[i].mask for i in t_val])
    seed_everything(options.seed)
    device = select_device(options.device)
    log(f"training the Gram/validation feature network ({options.feature_steps} steps)")
    samplers: list[PatchSampler] = list(data.samplers(options.patch, options.dims,
                                                      options.seed + 11))
    features = train_classifier(samplers, steps=options.feature_steps,
                                features=FEATURE_NET["features"], seed=options.seed,
                                device=device)
    result = fit(unpaired_step(data, options, features, device), options, log)
    feature_note = {**FEATURE_NET, "steps": options.feature_steps,
                    "trained_on": "training patches of both domains, labelled by scanner",
                    "why": "no pretrained VGG offline; a scanner classifier's features see"
                           " exactly the texture that separates the scanners",
                    "gram_layers": "all three conv stages"}
    generator = _save(options, folder, result, modality, sources, targets,
                      {"feature_network": feature_note}, log)
    rows: list[list[np.ndarray]] = []
    held = HeldOut(("before", "after", "target"))
    for k, (i, j) in enumerate(zip(s_val, t_val * len(s_val), strict=False)):
        raw = sources[i].volume.array
        before = metric_units(raw, modality)
        after = metric_units(harmonise_array(generator, raw, norm, options.dims, device),
                             modality)
        target = metric_units(targets[j].volume.array, modality)
        held.add_unpaired({"before": before, "after": after}, sources[i].mask)
        held.add_target(target, targets[j].mask)
        if k == 0:
            zs, zt = _report_slices(len(before)), _report_slices(len(target))
            rows = [[before[a], after[a], target[b]] for a, b in zip(zs, zt, strict=False)]
    _write_report(folder, result, modality, rows,
                  ["before (source)", "after (harmonised)", "target (other subject)"],
                  held.histograms(),
                  {"validation_best": result.best, "best_step": result.best_step,
                   "steps": result.steps, "seconds": result.seconds})
    return TrainOutcome(folder, result.best, result, {})
