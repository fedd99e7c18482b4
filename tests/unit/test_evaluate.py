"""Evaluation: metric definitions, radiomics CCC, and ``dicomnode evaluate`` JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import trainers.evaluate as evaluate_module
from dicomnode.cli import main
from tests.model_factory import make_model
from trainers.metrics import image_metrics, ncc, psnr, rmse
from trainers.radiomics_ccc import CLASSES, ccc, class_ccc, roi_corners, roi_features
from trainers.simulation import simulate_series

CONTRACT_KEYS = {"psnr", "ssim", "rmse", "ncc", "radiomics_ccc", "domain_accuracy", "baseline"}


def test_metrics_on_known_images() -> None:
    rng = np.random.default_rng(0)
    target = rng.normal(0, 100, (3, 32, 32))
    mask = np.zeros(target.shape, bool)
    mask[:, 4:28, 4:28] = True
    noisy = target + 10.0
    assert rmse(noisy, target, mask) == pytest.approx(10.0)
    assert psnr(noisy, target, mask, 1000.0) == pytest.approx(40.0)
    assert ncc(noisy, target, mask) == pytest.approx(1.0)
    same = image_metrics(target, target, mask, 1000.0)
    assert same["ssim"] == pytest.approx(1.0) and math.isinf(same["psnr"])
    worse = image_metrics(target + rng.normal(0, 50, target.shape), target, mask, 600.0)
    assert worse["ssim"] < 0.9 and worse["ncc"] < 1


def test_ssim_does_not_depend_on_where_the_values_sit() -> None:
    # a 20-unit offset costs the same around water (0 HU) as around bone (1000 HU): SSIM sees
    # intensities shifted by the target's minimum in the mask, never means near zero
    rng = np.random.default_rng(1)
    target = rng.normal(0, 30, (2, 32, 32))
    mask = np.ones(target.shape, bool)
    near_zero = image_metrics(target + 20, target, mask, 200.0)["ssim"]
    far = image_metrics(target + 1020, target + 1000, mask, 200.0)["ssim"]
    assert near_zero == pytest.approx(far, abs=1e-4)
    assert 0.5 < near_zero < 1


def test_ccc_definition() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert ccc(x, x) == pytest.approx(1.0)
    assert ccc(x, x + 1) < 1 and ccc(x - 2.5, 2.5 - x) == pytest.approx(-1.0)
    assert math.isnan(ccc(np.ones(3), np.ones(3)))


def test_radiomics_ccc_per_class() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(40, 30, (2, 40, 40)).astype(np.float32)
    mask = np.ones(image.shape, bool)
    corners = roi_corners([mask], 12, 6, seed=0)
    assert len(corners) == 6 and all(0 <= r <= 28 and 0 <= c <= 28 for _, _, r, c in corners)
    feats = roi_features([image], corners, 12, 25.0)
    same = class_ccc(feats, feats)
    assert set(same) == {*CLASSES, "texture_mean"} and same["glcm"] == pytest.approx(1.0)
    other = roi_features([image * 0.5 + 100], corners, 12, 25.0)
    assert class_ccc(other, feats)["firstorder"] < 0.9


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    for domain, kind in (("siemens-b70f", "src"), ("siemens-b30f", "tgt")):
        for s in (0, 1):
            simulate_series("CT", domain, root / kind / str(s), subject=s, slices=4, size=64,
                            progress=False)
    return root


def test_evaluate_cli_prints_contract_json(series: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(evaluate_module, "CLASSIFIER_STEPS", 10)
    monkeypatch.setattr(evaluate_module, "ROIS", 8)
    monkeypatch.setattr(evaluate_module, "TEST_PATCHES", 16)
    make_model(tmp_path / "models", "smooth", modality="CT")
    capsys.readouterr()
    rc = main(["evaluate", "--model", "smooth", "--models-dir", str(tmp_path / "models"),
               "--source", str(series / "src"), "--target", str(series / "tgt"),
               "--report", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)  # stdout holds nothing but the JSON
    assert CONTRACT_KEYS <= set(result) and result["paired"] is True
    for key in ("psnr", "ssim", "rmse", "ncc"):
        assert set(result[key]) == {"before", "after"}
        assert set(result["baseline"][key]) == {"before", "after"}
    assert result["psnr"]["after"] > result["psnr"]["before"]  # smoothing sharp -> smooth
    assert set(result["radiomics_ccc"]) >= set(CLASSES)
    assert 0 <= result["domain_accuracy"] <= 1 and 0 <= result["baseline"]["domain_accuracy"]
    for name in ("metrics.json", "comparison.png", "histograms.png"):
        assert (tmp_path / "report" / name).is_file()


def test_evaluate_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["evaluate", "--model", "missing", "--models-dir", str(tmp_path),
               "--source", str(tmp_path), "--target", str(tmp_path)])
    assert rc == 2 and "no model 'missing'" in capsys.readouterr().err
