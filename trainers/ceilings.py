"""How close can any harmonisation come? Ceilings of the paired metrics for a scanner pair.

    python -m trainers.ceilings --source ge-1.5t-t1w --target siemens-3t-t1w [--size 256]
        [--subjects 100 101 102] [--slices 16] [--json] [--radiomics]

``dicomnode evaluate`` scores an output against one acquisition of the target scanner,
whose noise is its own and whose detail the source scanner may never have acquired, so no
output reaches SSIM 1. Each row here is an image of the same simulated subjects, scored
against that target acquisition with evaluate's metrics, units and body mask:

* ``source``: the source scanner's own image (evaluate's "before");
* ``another target acquisition``: the target scanner again, another noise draw; where an
  output that carries the target's noise (one that passes for it) sits;
* ``noise-free target``: the target image without noise, a perfect denoising mapping;
* ``noise-free target at the source's resolution``: the target's contrast and calibration
  acquired with the source's slice thickness and k-space extent (MR) or kernel (CT),
  noise-free: a perfect mapping that cannot restore detail the source never acquired.

``--radiomics`` adds each row's share of reproducible radiomic features (CCC >= 0.85 against
the target acquisition, evaluate's ROIs, bins and threshold): "another target acquisition" is
the share a radiomics study gets between two scans on the target scanner itself, the ceiling
of any harmonisation's ``reproducible_share``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from trainers.data import body_mask
from trainers.evaluate import ROIS, bin_width_for, roi_size
from trainers.heldout import mean_metrics
from trainers.metrics import data_range, image_metrics, metric_units
from trainers.radiomics_ccc import feature_ccc, reproducible_share, roi_corners, roi_features
from trainers.ship_models import SLICES, TEST_SUBJECTS  # the shipped models' held-out series
from trainers.simulation import CTDomain, Domain, MRDomain, acquire_volume, find_domain
from trainers.simulation.dicom_writer import CT_RESCALE_INTERCEPT


def variants(source: Domain, target: Domain) -> dict[str, tuple[Domain, int]]:
    """Row name -> (domain acquired, noise seed), for a source and target of one modality."""
    quiet: dict[str, float] = {"snr": math.inf} if target.modality == "MR" else {"mas": math.inf}
    resolution: dict[str, object] = {"slice_thickness": source.slice_thickness}
    if isinstance(source, MRDomain) and isinstance(target, MRDomain):
        resolution.update(kspace_fraction=source.kspace_fraction,
                          apodisation=source.apodisation)
    elif isinstance(source, CTDomain) and isinstance(target, CTDomain):
        resolution["kernel"] = source.kernel
    else:
        raise ValueError(f"{source.name} is {source.modality} but {target.name} is"
                         f" {target.modality}")
    return {"source": (source, 0),
            "another target acquisition": (target, 1),
            "noise-free target": (replace(target, **quiet), 0),
            "noise-free target at the source's resolution":
                (replace(target, **quiet, **resolution), 0)}


def _values(stored: np.ndarray, modality: str) -> np.ndarray:
    """Stored integers -> real values (HU for CT), as a loaded series holds them."""
    values = stored.astype(np.float32)
    return values + CT_RESCALE_INTERCEPT if modality == "CT" else values


def ceilings(source: str, target: str, size: int | None = None,
             subjects: Sequence[int] = TEST_SUBJECTS, slices: int = SLICES,
             progress: bool | None = None, radiomics: bool = False
             ) -> dict[str, dict[str, float]]:
    """Row -> mean PSNR (dB), SSIM, RMSE and NCC over ``subjects`` against the target (with
    ``radiomics``, also ``reproducible``: the overall share of reproducible features)."""
    src, tgt = find_domain(source), find_domain(target)
    if not subjects:
        raise ValueError("need at least one subject")
    rows, modality = variants(src, tgt), tgt.modality
    scores: dict[str, list[dict[str, float]]] = {row: [] for row in rows}
    images: dict[str, list[np.ndarray]] = {row: [] for row in [*rows, "target"]}
    masks = []
    bar = tqdm(total=len(subjects) * (len(rows) + 1), desc="ceilings", unit="acquisition",
               disable=None if progress is None else not progress)
    for subject in subjects:
        reference = _values(acquire_volume(tgt, subject, slices, size), modality)
        wanted, reference_mask = metric_units(reference, modality), body_mask(reference, modality)
        images["target"].append(wanted)
        masks.append(reference_mask)
        bar.update()
        for row, (domain, noise_seed) in rows.items():
            image = _values(acquire_volume(domain, subject, slices, size,
                                           noise_seed=noise_seed), modality)
            mask = body_mask(image, modality) | reference_mask
            images[row].append(metric_units(image, modality))
            masks[-1] = masks[-1] | mask
            scores[row].append(image_metrics(images[row][-1], wanted, mask,
                                             data_range(wanted, mask)))
            bar.update()
    bar.close()
    result = {row: mean_metrics(values) for row, values in scores.items()}
    if radiomics:
        for row, share in reproducible(images, masks, modality).items():
            result[row]["reproducible"] = share
    return result


def reproducible(images: dict[str, list[np.ndarray]], masks: Sequence[np.ndarray],
                 modality: str, seed: int = 0) -> dict[str, float]:
    """Row -> overall share of features with CCC >= 0.85 against ``images["target"]``, at
    evaluate's ROIs (count, size, bin width) inside ``masks``."""
    size = roi_size(masks)
    corners = roi_corners(masks, size, ROIS, seed)
    feats = {row: roi_features(volumes, corners, size, bin_width_for(modality))
             for row, volumes in images.items()}
    return {row: reproducible_share(feature_ccc(f, feats["target"]))["overall"]
            for row, f in feats.items() if row != "target"}


def table(result: dict[str, dict[str, float]]) -> str:
    """The rows as a markdown table."""
    extra = "reproducible" in next(iter(result.values()))
    lines = ["| against one target acquisition | SSIM | PSNR (dB) | RMSE | NCC |"
             + (" reproducible features |" if extra else ""),
             "|---|---|---|---|---|" + ("---|" if extra else "")]
    lines += [f"| {row} | {m['ssim']:.3f} | {m['psnr']:.1f} | {m['rmse']:.3g} | {m['ncc']:.3f} |"
              + (f" {m['reproducible']:.2f} |" if extra else "") for row, m in result.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="source scanner domain")
    p.add_argument("--target", required=True, help="target scanner domain")
    p.add_argument("--size", type=int, default=None, help="matrix (default CT 512, MR 256)")
    p.add_argument("--subjects", type=int, nargs="+", default=list(TEST_SUBJECTS))
    p.add_argument("--slices", type=int, default=SLICES)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--radiomics", action="store_true", help="add each row's share of"
                   " reproducible radiomic features (CCC >= 0.85)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        result = ceilings(args.source, args.target, args.size, args.subjects, args.slices,
                          progress=False if args.no_progress else None,
                          radiomics=args.radiomics)
    except ValueError as exc:
        p.error(str(exc))
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
