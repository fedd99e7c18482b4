"""Distillation: a teacher model's outputs on the source series as the paired targets.

A smaller or faster student learns to do what a shipped model does: every source series
is harmonised by the teacher exactly as the node would (normalisation, the teacher's pixel
spacing, its generator, back onto the series' grid; without the grain, which the node adds
after the generator) and the result becomes a target series on the same frame of reference
and slices, which :func:`trainers.data.pair_series` pairs with its source. The student's
model folder inherits what is the teacher's to say: the target domain and the grain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from pipelines.harmonise import finish_volume, generate_volume
from pipelines.inference import InferenceSettings
from pipelines.model_folder import LoadedModel
from trainers.data import Series


def teacher_targets(teacher: LoadedModel, sources: Sequence[Series]) -> list[Series]:
    """Per source series, the teacher's output (real values, no grain) as a series that
    shares the source's header, frames and body mask."""
    info = teacher.info
    settings = InferenceSettings(device="cpu", bf16=False)
    out = []
    for s in sources:
        output, translation = generate_volume(
            teacher.generator, s.volume.array, info.normalisation, info.dims, settings,
            spacing=s.volume.spacing[1:], model_spacing=info.pixel_spacing,
            name=f"teacher '{info.name}'")
        harmonised = finish_volume(s.volume.array, output, translation, info.normalisation,
                                   s.volume.padding)
        volume = dataclasses.replace(s.volume, array=harmonised)
        out.append(Series(f"{s.uid}.teacher", s.files, volume, s.mask))
    return out


def teacher_note(teacher: LoadedModel) -> dict[str, Any]:
    """What model.json's training summary records of the teacher."""
    info = teacher.info
    return {"name": info.name, "version": info.version, "architecture": info.architecture,
            "params": info.params, "weights_sha256": info.weights_sha256}
