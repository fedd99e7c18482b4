"""``dicomnode train synthetic``: paired training on pairs made from unpaired series.

1. Fit the source scanner's acquisition (:mod:`trainers.acquisition`) on the source and
   target series at one matrix and pixel size.
2. Run it on every target series ``--draws`` times: synthetic source series that share the
   target's frame of reference and slices, so :func:`trainers.train.train_paired_series`
   pairs them.
3. Train the paired recipe (L1 + SSIM) on those pairs.
4. Choose the grain: the least fraction of the target scanner's receiver noise
   (:func:`trainers.acquisition.background_noise`, :mod:`pipelines.grain`) with which a
   scanner classifier, trained on the unharmonised series, tells the real source series'
   output from the target scanner's series no better than ``PASS``. The regression's
   output is the mean target given the source, smoother than any scan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.grain import Grain
from pipelines.harmonise import finish_volume, generate_volume
from pipelines.inference import InferenceSettings
from pipelines.model_folder import LoadedModel, load_model_folder, save_model_folder
from pipelines.series import element_text
from trainers.acquisition import Acquisition, background_noise, fit_acquisition
from trainers.data import Series
from trainers.evaluate import domain_accuracy
from trainers.options import SyntheticOptions
from trainers.train import (
    Log,
    TrainingError,
    TrainOutcome,
    describe_domain,
    train_paired_series,
)

PASS = 0.6                                    # classifier accuracy the output must not exceed
FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)     # grain fractions tried, least first


def kspace_edge(series: Series) -> float:
    """Fraction of k-space the scanner acquires: PercentSampling / 100 (100 % if absent)."""
    text = element_text(series.header, "PercentSampling")
    try:
        value = float(text) / 100.0 if text else 1.0
    except ValueError:
        value = 1.0
    return min(max(value, 0.05), 1.0)


def _one_grid(sources: Sequence[Series], targets: Sequence[Series],
              log: Log) -> tuple[list[Series], list[Series]]:
    """The series at the source series' most common matrix and pixel size."""
    def grid(s: Series) -> tuple[Any, ...]:
        return (*s.volume.array.shape[1:], *np.round(s.volume.spacing[1:], 3))

    grids = [grid(s) for s in sources]
    common = max(set(grids), key=grids.count)
    src = [s for s in sources if grid(s) == common]
    tgt = [t for t in targets if grid(t) == common]
    if len(tgt) < 2:
        raise TrainingError(f"synthetic training needs at least 2 target series on the"
                            f" source series' grid ({common[0]}x{common[1]} at {common[2]} mm);"
                            f" found {len(tgt)}")
    skipped = len(sources) + len(targets) - len(src) - len(tgt)
    if skipped:
        log(f"{skipped} series on other grids left out (the acquisition is fitted on one)")
    return src, tgt


def synthesise_series(acquisition: Acquisition, targets: Sequence[Series], draws: int,
                      seed: int) -> list[Series]:
    """``draws`` synthetic source series per target series, on the target's slices."""
    rng = np.random.default_rng(seed)
    out = []
    for t in targets:
        for k in range(draws):
            volume = dataclasses.replace(
                t.volume, array=acquisition.synthesise(t.volume.array, rng))
            out.append(Series(f"{t.uid}.synthetic{k}", t.files, volume, t.mask))
    return out


def choose_grain(model: LoadedModel, sources: Sequence[Series], targets: Sequence[Series],
                 noise: Grain, seed: int, log: Log) -> Grain:
    """The least fraction of ``noise`` (of ``FRACTIONS``) whose output passes for the target
    scanner. The generator runs once per series; each fraction finishes its output as the
    node does."""
    info, settings = model.info, InferenceSettings(device="cpu", batch_size=4, bf16=False)
    generated = [generate_volume(model.generator, s.volume.array, info.normalisation, info.dims,
                                 settings, spacing=s.volume.spacing[1:],
                                 model_spacing=info.pixel_spacing) for s in sources]
    candidates = {f"{fraction:g}": [
        finish_volume(s.volume.array, output.copy(), translation, info.normalisation,
                      grain=dataclasses.replace(noise, fraction=fraction))
        for s, (output, translation) in zip(sources, generated, strict=True)]
        for fraction in FRACTIONS}
    accuracy = domain_accuracy(sources, targets, candidates, sources[0].modality, seed, log)
    log("grain: classifier accuracy " + ", ".join(f"{f}: {a:.2f}" for f, a in accuracy.items()))
    chosen = next((f for f in FRACTIONS if accuracy[f"{f:g}"] <= PASS), FRACTIONS[-1])
    return dataclasses.replace(noise, fraction=chosen)


def train_synthetic_series(options: SyntheticOptions, sources: Sequence[Series],
                           targets: Sequence[Series], folder: Path,
                           log: Log = print) -> TrainOutcome:
    """Fit, synthesise, train paired, choose the grain; write the model folder."""
    modality = sources[0].modality
    if modality != "MR" or targets[0].modality != "MR":
        raise TrainingError("synthetic training models an MR acquisition (magnitude,"
                            " k-space window, receiver noise); source and target must be MR")
    if options.grain > 1:
        raise TrainingError(f"--grain is a fraction of the target's noise (0 to 1, or -1 to"
                            f" choose it), got {options.grain:g}")
    sources, targets = _one_grid(sources, targets, log)
    edge = kspace_edge(sources[0])
    log(f"fitting the source acquisition (k-space edge {edge:g} from PercentSampling)"
        f" on {len(sources)} source and {len(targets)} target series")
    acquisition = fit_acquisition([t.volume.array for t in targets], [t.mask for t in targets],
                                  [s.volume.array for s in sources], [s.mask for s in sources],
                                  edge, steps=options.fit_steps, seed=options.seed, log=log)
    synthetic = synthesise_series(acquisition, targets, options.draws, options.seed)
    outcome = train_paired_series(options, synthetic, targets, folder, log)
    # the target's receiver noise; the taper of its window is not measured (none)
    noise = Grain(background_noise([t.volume.array for t in targets], [t.mask for t in targets]),
                  kspace_edge(targets[0]), 0.0, 1.0)
    model = load_model_folder(folder)
    grain = (choose_grain(model, sources, targets, noise, options.seed, log)
             if options.grain < 0 else dataclasses.replace(noise, fraction=options.grain))
    log(f"grain: {grain.fraction:g} of the target's receiver noise (sigma {grain.sigma:.4f})")
    info = model.info
    training = {**info.training, "mode": "synthetic", "acquisition": acquisition.to_spec(),
                "synthetic_from": len(targets), "real_source_series": len(sources)}
    save_model_folder(folder, model.generator, name=info.name, version=info.version,
                      architecture=info.architecture, params=info.params,
                      source=describe_domain(options.source_domain, sources),
                      target=info.target, normalisation=info.normalisation.to_spec(),
                      training=training, validation=info.validation,
                      pixel_spacing=info.pixel_spacing, grain=grain)
    return outcome
