"""Metric ceilings of a scanner pair: variants of the target acquired on the same anatomy."""

from __future__ import annotations

import json
import math

import pytest

from trainers.ceilings import ceilings, main, variants
from trainers.simulation import DOMAINS

SMALL = {"size": 64, "slices": 2, "subjects": (100,)}


def test_resolution_row_takes_the_sources_acquisition_and_the_targets_contrast():
    rows = variants(DOMAINS["ge-1.5t-t1w"], DOMAINS["siemens-3t-t1w"])
    domain, noise_seed = rows["noise-free target at the source's resolution"]
    assert (domain.kspace_fraction, domain.slice_thickness, domain.snr) == (0.75, 4.0, math.inf)
    assert (domain.sequence, domain.ti, noise_seed) == ("IR-GRE", 900, 0)
    ct = variants(DOMAINS["ge-standard"], DOMAINS["siemens-b30f"])
    kernel = ct["noise-free target at the source's resolution"][0]
    assert kernel.kernel == DOMAINS["ge-standard"].kernel and kernel.hu_offset == 0.0
    assert ct["another target acquisition"] == (DOMAINS["siemens-b30f"], 1)


@pytest.mark.parametrize("source, target", [("ge-1.5t-t1w", "siemens-3t-t1w"),
                                            ("ge-standard", "siemens-b30f")])
def test_noise_free_target_bounds_another_acquisition_which_bounds_the_source(source, target):
    result = ceilings(source, target, progress=False, **SMALL)
    ssim = {row: metrics["ssim"] for row, metrics in result.items()}
    assert ssim["source"] < ssim["another target acquisition"] < ssim["noise-free target"] < 1
    assert ssim["noise-free target at the source's resolution"] < ssim["noise-free target"]
    assert result["noise-free target"]["rmse"] < result["another target acquisition"]["rmse"]


def test_cli_prints_json_and_rejects_mixed_modalities(capsys):
    assert main(["--source", "ge-1.5t-t1w", "--target", "siemens-3t-t1w", "--size", "64",
                 "--slices", "2", "--subjects", "100", "--json", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {"source", "another target acquisition", "noise-free target",
                         "noise-free target at the source's resolution"}
    assert set(rows["source"]) == {"psnr", "ssim", "rmse", "ncc"}
    for argv, message in ((["--source", "ge-standard", "--target", "siemens-3t-t1w"],
                           "ge-standard is CT but siemens-3t-t1w is MR"),
                          (["--source", "ge-9t", "--target", "siemens-3t-t1w"],
                           "unknown domain 'ge-9t'")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_radiomics_ceiling_is_another_target_acquisitions_share():
    """Two scans on the target scanner agree on more radiomic features than the source
    scanner's scan of the same anatomy does."""
    result = ceilings("ge-1.5t-t1w", "siemens-3t-t1w", progress=False, radiomics=True, **SMALL)
    share = {row: metrics["reproducible"] for row, metrics in result.items()}
    assert 0 <= share["source"] < share["another target acquisition"] <= 1
    assert share["noise-free target"] >= share["source"]
