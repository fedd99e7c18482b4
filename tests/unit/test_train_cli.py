"""``dicomnode train paired|unpaired|synthetic|site`` end to end on tiny simulated series."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

import trainers.evaluate as evaluate_module
from dicomnode.cli import main
from pipelines.derived import PRIVATE_CREATOR, PRIVATE_GROUP
from pipelines.grain import Grain
from pipelines.harmonise import ModelCache, harmonise_series
from pipelines.model_folder import load_model_folder, read_model_info
from pipelines.series import load_series
from tests.dicom_factory import raw_data, siemens_non_image, write_series
from tests.model_factory import make_model
from trainers.data import load_series_dir
from trainers.distil import teacher_targets
from trainers.simulation import simulate_series

SIZE, SLICES = 48, 4
TINY = ["--patch", "32", "--batch", "2", "--steps", "4", "--val-every", "2", "--no-progress",
        "--device", "cpu"]


def simulate(root: Path, modality: str, domain: str, subjects: range) -> Path:
    for s in subjects:
        simulate_series(modality, domain, root / f"{domain}-{s}", subject=s, slices=SLICES,
                        size=SIZE, progress=False)
    return root


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    simulate(root / "sharp", "CT", "siemens-b70f", range(3))
    simulate(root / "smooth", "CT", "siemens-b30f", range(3))
    return root


def site_config(tmp_path: Path, models: Path, route: str, model: str, match: str,
                target: str) -> Path:
    """A node config whose spool is ``tmp_path/var/spool``, with one route to ``model``."""
    config = tmp_path / "node.toml"
    config.write_text(f"""
[node]
data_dir = "{tmp_path / 'var'}"
models_dir = "{models}"
[[routes]]
name = "{route}"
model = "{model}"
[routes.match]
{match}
[routes.target]
{target}
""")
    return config


@pytest.fixture()
def fast_evaluate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate_module, "CLASSIFIER_STEPS", 5)
    monkeypatch.setattr(evaluate_module, "ROIS", 6)
    monkeypatch.setattr(evaluate_module, "TEST_PATCHES", 8)


def test_train_paired_writes_a_loadable_model_folder(ct: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    rc = main(["train", "paired", "--source", str(ct / "sharp"), "--target", str(ct / "smooth"),
               "--name", "k", "--models-dir", str(models), "--workdir", str(tmp_path / "run"),
               "--param", "features=4", "--param", "blocks=3", "--source-domain",
               "siemens-b70f", *TINY])
    assert rc == 0
    info = read_model_info(models / "k")
    assert info.architecture == "plain" and info.params == {"features": 4, "blocks": 3,
                                                              "dims": 2}
    assert info.source["name"] == "siemens-b70f" and info.source["ConvolutionKernel"] == "B70f"
    assert info.normalisation.kind == "hu_window"
    assert info.training["steps"] == 4 and info.training["pairs"] == 3
    assert "psnr" in info.validation["best"]
    load_model_folder(models / "k")  # sha256 verified
    for name in ("losses.png", "comparison.png", "histograms.png", "metrics.json",
                 "history.csv"):
        assert (models / "k" / "report" / name).is_file()
    metrics = json.loads((models / "k" / "report" / "metrics.json").read_text())
    assert set(metrics["heldout"]) == {"psnr", "ssim", "rmse", "ncc"}

    # never silently overwrite; --resume continues the run
    rc = main(["train", "paired", "--source", str(ct / "sharp"), "--target", str(ct / "smooth"),
               "--name", "k", "--models-dir", str(models), *TINY])
    assert rc == 2
    rc = main(["train", "paired", "--source", str(ct / "sharp"), "--target", str(ct / "smooth"),
               "--name", "k", "--models-dir", str(models), "--workdir", str(tmp_path / "run"),
               "--param", "features=4", "--param", "blocks=3", "--force", "--resume",
               *TINY[:4], "--steps", "6", *TINY[6:]])
    assert rc == 0 and read_model_info(models / "k").training["steps"] == 6


def test_train_at_a_pixel_spacing_records_it_for_the_node(ct: Path, tmp_path: Path,
                                                         capsys) -> None:
    """--pixel-spacing: the series (7.9 mm pixels) train resampled to 4 mm, and model.json
    tells the node to run the model there."""
    models = tmp_path / "models"
    rc = main(["train", "paired", "--source", str(ct / "sharp"), "--target", str(ct / "smooth"),
               "--name", "k", "--models-dir", str(models), "--workdir", str(tmp_path / "run"),
               "--param", "features=4", "--param", "blocks=2", "--pixel-spacing", "4",
               "--patch", "64", *TINY[2:]])
    assert rc == 0
    info = read_model_info(models / "k")
    assert info.pixel_spacing == (4.0, 4.0) and info.training["options"]["pixel_spacing"] == 4
    assert info.training["pairs"] == 3  # patches of 64 px exist only on the 95-px grid
    files = sorted((ct / "sharp" / "siemens-b70f-0").glob("*.dcm"))
    outcome = harmonise_series(files, routes=[], models_dir=models, out_dir=tmp_path / "out",
                               model_name="k", cache=ModelCache(1))
    assert outcome.status == "harmonised" and len(outcome.outputs) == SLICES
    assert dcmread(outcome.outputs[0]).Rows == SIZE
    with pytest.raises(SystemExit) as exit_:
        main(["train", "paired", "--source", str(ct / "sharp"), "--target", str(ct / "smooth"),
              "--name", "n", "--models-dir", str(models), "--pixel-spacing", "-1", *TINY])
    assert exit_.value.code == 2
    assert "--pixel-spacing: expected a length in mm (0 or more), got '-1'" in \
        capsys.readouterr().err


def test_train_errors_are_one_line(ct: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", "paired", "--source", str(ct / "sharp"), "--target", str(tmp_path),
               "--name", "x", "--models-dir", str(tmp_path / "m"), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("dicomnode train: error:") and "no loadable" in err[-1]
    rc = main(["train", "paired", "--source", str(ct / "sharp"), "--target",
               str(ct / "sharp"), "--name", "../x", "--models-dir", str(tmp_path / "m"), *TINY])
    assert rc == 2


def test_train_unpaired_with_gram_and_wgan(ct: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    rc = main(["train", "unpaired", "--source", str(ct / "sharp"), "--target",
               str(ct / "smooth"), "--name", "u", "--models-dir", str(models),
               "--workdir", str(tmp_path / "run"), "--param", "features=4",
               "--param", "levels=2", "--param", "cbam=true", "--gan", "wgan-gp", "--gram", "1",
               "--ssim", "1", "--disc-features", "4", "--disc-layers", "2",
               "--feature-steps", "3", *TINY])
    assert rc == 0
    info = read_model_info(models / "u")
    assert info.architecture == "unet" and info.params["cbam"] is True
    assert info.training["feature_network"]["architecture"] == "DomainClassifier"
    assert "domain_distance" in info.validation["best"]


def test_train_site_writes_a_new_version_and_compares(ct: Path, tmp_path: Path,
                                                      fast_evaluate: None, capsys) -> None:
    spool = tmp_path / "var" / "spool"
    shutil.copytree(ct / "sharp", spool / "study-a")
    shutil.copytree(ct / "smooth", spool / "study-b")
    simulate(spool / "study-c", "CT", "siemens-b70f", range(3, 5))
    simulate(spool / "study-d", "CT", "siemens-b30f", range(3, 5))
    # what else the studies brought shares the route's tags: a scout, a private object
    sharp = dcmread(next((spool / "study-c").rglob("*.dcm")))
    write_series(spool / "study-c" / "scout", kernel=sharp.ConvolutionKernel, slices=2,
                 size=16, edit=lambda ds, i: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY",
                                                                      "LOCALIZER"]))
    csa = siemens_non_image(sharp)
    csa.ConvolutionKernel = sharp.ConvolutionKernel
    csa.save_as(spool / "study-c" / "csa.dcm", enforce_file_format=True)
    # and one raw data object inside a source series (Philips MR does this): set aside
    raw_data(sharp).save_as(spool / "study-c" / "raw.dcm", enforce_file_format=True)
    models = tmp_path / "models"
    main(["train", "paired", "--source", str(ct / "sharp"), "--target", str(ct / "smooth"),
          "--name", "kernel", "--models-dir", str(models), "--workdir", str(tmp_path / "r0"),
          "--param", "features=4", "--param", "blocks=3", "--pixel-spacing", "7", *TINY])
    deployed = (models / "kernel" / "weights.pt").read_bytes()
    config = site_config(tmp_path, models, "sharp", "kernel", 'Modality = "CT"\n'
                         'ConvolutionKernel = "B7*"', 'Modality = "CT"\nConvolutionKernel = "B3*"')
    rc = main(["train", "site", "--route", "sharp", "--config", str(config),
               "--workdir", str(tmp_path / "r1"), *TINY])
    assert rc == 0
    assert "route 'sharp': 5 source and 5 target series" in capsys.readouterr().out
    new = read_model_info(models / "kernel-v1.1")
    assert new.version == "1.1" and new.architecture == "plain"  # the deployed architecture
    assert new.pixel_spacing == (7.0, 7.0)  # and where it works
    assert (models / "kernel" / "weights.pt").read_bytes() == deployed
    comparison = json.loads((models / "kernel-v1.1" / "report" /
                             "site-comparison.json").read_text())
    assert comparison["score"] == "psnr" and comparison["deployed"]["model"] == "kernel"
    assert isinstance(comparison["new_is_better"], bool)
    rc = main(["train", "site", "--route", "nope", "--config", str(config), *TINY])
    assert rc == 2


@pytest.fixture(scope="module")
def mr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GE 1.5 T and Siemens 3 T T1w series of different subjects: unpaired."""
    root = tmp_path_factory.mktemp("mr")
    simulate(root / "ge", "MR", "ge-1.5t-t1w", range(3))
    simulate(root / "siemens", "MR", "siemens-3t-t1w", range(10, 13))
    return root


def test_train_synthetic_fits_ge_and_gives_back_siemens_grain(
        mr: Path, tmp_path: Path, fast_evaluate: None, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    rc = main(["train", "synthetic", "--source", str(mr / "ge"), "--target",
               str(mr / "siemens"), "--name", "s", "--models-dir", str(models),
               "--workdir", str(tmp_path / "run"), "--param", "features=4", "--param",
               "levels=2", "--fit-steps", "5", "--draws", "2", *TINY])
    assert rc == 0
    info = read_model_info(models / "s")
    assert info.training["mode"] == "synthetic" and info.training["pairs"] == 6
    assert info.source["Manufacturer"] == "GE MEDICAL SYSTEMS"      # the real source's tags
    assert info.target["Manufacturer"] == "SIEMENS"
    assert info.training["acquisition"]["edge"] == 0.75             # GE's PercentSampling
    assert info.grain is not None and info.grain.edge == 1.0
    assert info.grain.fraction in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5) and info.grain.sigma > 0
    # the node adds the grain, the same on every run of the same series
    ge = sorted((mr / "ge" / "ge-1.5t-t1w-0").glob("*.dcm"))
    pixels = []
    for run in ("a", "b"):
        outcome = harmonise_series(ge, routes=[], models_dir=models, out_dir=tmp_path / run,
                                   model_name="s", cache=ModelCache(1))
        assert outcome.status == "harmonised"
        pixels.append([dcmread(p).PixelData for p in sorted(outcome.outputs)])
    assert pixels[0] == pixels[1]
    block = dcmread(outcome.outputs[0]).private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert json.loads(block[0x14].value)["grain"] == info.grain.to_spec()  # provenance

    # train site keeps the deployed model's mode when the spool holds no pairs
    spool = tmp_path / "var" / "spool"
    shutil.copytree(mr / "ge", spool / "study-ge")
    shutil.copytree(mr / "siemens", spool / "study-siemens")
    config = site_config(tmp_path, models, "mr", "s", 'Manufacturer = "GE*"',
                         'Manufacturer = "SIEMENS"')
    rc = main(["train", "site", "--route", "mr", "--config", str(config), "--workdir",
               str(tmp_path / "r1"), "--fit-steps", "3", "--draws", "1", *TINY])
    assert rc == 0 and "training synthetic unet as s-v1.1" in capsys.readouterr().out
    new = read_model_info(models / "s-v1.1")
    assert new.training["mode"] == "synthetic" and new.grain is not None


def test_train_paired_distils_a_teacher_without_target_series(mr: Path, tmp_path: Path,
                                                             capsys) -> None:
    """--teacher: the teacher's outputs on the source series are the targets, as the node
    makes them before the grain; the student takes the teacher's target domain and grain
    and names its teacher."""
    grain = Grain(0.02, 1.0, 0.0, 0.3)
    teacher = make_model(tmp_path / "teachers", "t", modality="MR", mix=0.7, grain=grain)
    models = tmp_path / "models"
    common = ["--name", "s", "--models-dir", str(models), "--workdir", str(tmp_path / "run"),
              "--architecture", "shuffle-unet", "--param", "features=4", "--param",
              "levels=1", *TINY]
    assert main(["train", "paired", "--source", str(mr / "ge"), "--teacher", str(teacher),
                 *common]) == 0
    info, taught = read_model_info(models / "s"), read_model_info(teacher)
    assert info.target == taught.target and info.grain == grain
    assert info.source["Manufacturer"] == "GE MEDICAL SYSTEMS"
    assert info.training["teacher"]["weights_sha256"] == taught.weights_sha256
    assert info.training["pairs"] == 3 and info.cost["slice"] == [256, 256]
    # a target is the node's output of a grain-less teacher, up to the stored integers
    plain = make_model(tmp_path / "teachers", "t0", modality="MR", mix=0.7)
    series = load_series_dir(mr / "ge" / "ge-1.5t-t1w-0")
    (target,) = teacher_targets(load_model_folder(plain), series)
    outcome = harmonise_series(series[0].files, routes=[], models_dir=tmp_path / "teachers",
                               out_dir=tmp_path / "out", model_name="t0", cache=ModelCache(1))
    derived = load_series(outcome.outputs).array
    assert np.abs(target.volume.array - derived).max() <= 0.5 + 1e-3
    assert np.abs(target.volume.array - series[0].volume.array).max() > 5
    ct_teacher = make_model(tmp_path / "teachers", "c", modality="CT")
    rc = main(["train", "paired", "--source", str(mr / "ge"), "--teacher", str(ct_teacher),
               "--force", *common])
    assert rc == 2 and "is for CT, --source is MR" in capsys.readouterr().err


def test_train_synthetic_takes_a_fixed_grain_and_refuses_ct(mr: Path, ct: Path, tmp_path: Path,
                                                            capsys) -> None:
    models = tmp_path / "models"
    common = ["--name", "f", "--models-dir", str(models), "--param", "features=4",
              "--param", "levels=2", "--fit-steps", "3", "--draws", "1", *TINY]
    assert main(["train", "synthetic", "--source", str(mr / "ge"), "--target",
                 str(mr / "siemens"), "--grain", "0.25", *common]) == 0
    assert read_model_info(models / "f").grain.fraction == 0.25
    rc = main(["train", "synthetic", "--source", str(mr / "ge"), "--target",
               str(mr / "siemens"), "--grain", "1.5", "--force", *common])
    assert rc == 2 and "--grain is a fraction" in capsys.readouterr().err
    rc = main(["train", "synthetic", "--source", str(ct / "sharp"), "--target",
               str(ct / "smooth"), "--force", *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "source and target must be MR" in err[-1]
