"""Multi-domain harmonisation: StarGAN v2 networks, ``train multidomain``, routes that name a
target domain, derived-series provenance, ``models list``, ``evaluate --domain``, ``train site``
for a multi-domain route, and the radiomics / downstream metrics on known answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from dicomnode.cli import main
from dicomnode.config import ConfigError, load_config
from pipelines.derived import PRIVATE_CREATOR, PRIVATE_GROUP
from pipelines.harmonise import ModelCache, harmonise_series
from pipelines.inference import InferenceSettings, run_generator
from pipelines.model_folder import load_model_folder, read_model_info
from pipelines.networks import StyleUNet, build_generator
from tests.dicom_factory import write_series
from tests.model_factory import make_plain_model
from tests.unit.test_train_cli import fast_evaluate  # noqa: F401 - a fixture
from trainers.data import load_series_dir
from trainers.discriminators import DISCRIMINATORS, MultiTaskDiscriminator
from trainers.evaluate import score
from trainers.feature_stats import cohen_d, compare_features
from trainers.feature_stats import summary as feature_summary
from trainers.metrics import metric_units
from trainers.radiomics_ccc import feature_ccc, reproducible_share
from trainers.simulation import simulate_series
from trainers.style import MAPPING_NETWORKS, STYLE_ENCODERS, build_network
from trainers.tissue import CLASSES, TissueModel, dice, simulated_truth

SIZE, SLICES = 48, 4
DOMAINS = ("siemens-3t-t1w", "ge-1.5t-t1w", "canon-1.5t-t1w")
TINY = ["--patch", "32", "--batch", "2", "--steps", "4", "--val-every", "2", "--no-progress",
        "--device", "cpu", "--param", "features=4", "--param", "levels=2", "--style-dim", "4",
        "--latent-dim", "4", "--encoder-features", "4", "--disc-features", "4",
        "--feature-steps", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three MR T1w scanners, the same three subjects each (so pairs for the paired metrics)."""
    root = tmp_path_factory.mktemp("md")
    for domain in DOMAINS:
        for subject in range(3):
            simulate_series("MR", domain, root / domain / f"s{subject}", subject=subject,
                            slices=SLICES, size=SIZE, progress=False)
    return root


def _domains(data: Path) -> list[str]:
    return [a for d in DOMAINS for a in ("--domain", f"{d}={data / d}")]


@pytest.fixture(scope="module")
def models(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    rc = main(["train", "multidomain", *_domains(data), "--name", "md", "--models-dir",
               str(folder), "--workdir", str(folder.parent / "md-run"), "--ssim", "1",
               "--gram", "1", "--spectrum", "1", *TINY])
    assert rc == 0
    return folder


def test_style_networks_are_tile_safe_and_registered() -> None:
    torch.manual_seed(0)
    g = build_generator("stargan", {"features": 4, "levels": 2, "style_dim": 3, "domains": 3})
    assert isinstance(g, StyleUNet) and g.styles.shape == (3, 3)
    x = torch.randn(2, 1, 40, 36)
    assert torch.equal(g(x, torch.randn(2, 3)), x)  # zero-initialised output: the identity
    for p in g.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    g.styles.normal_()
    one = g.for_domain(1).eval()
    volume = np.random.default_rng(0).standard_normal((2, 70, 66)).astype(np.float32)
    whole = run_generator(one, volume, 2, InferenceSettings(device="cpu", bf16=False))
    tiled = run_generator(one, volume, 2, InferenceSettings(device="cpu", bf16=False,
                                                            patch_size=32, batch_size=3))
    assert np.abs(tiled - whole).max() < 1e-4 * np.abs(whole).max()  # no seams: no IN/AdaIN
    other = run_generator(g.for_domain(2).eval(), volume, 2,
                          InferenceSettings(device="cpu", bf16=False))
    assert np.abs(other - whole).mean() > 1e-3  # the style decides the output
    three_d = build_generator("stargan", {"features": 2, "levels": 1, "domains": 2, "dims": 3})
    assert three_d.for_domain(0)(torch.randn(1, 1, 5, 12, 10)).shape == (1, 1, 5, 12, 10)

    d = DISCRIMINATORS["multitask"](features=4, layers=2, domains=3)
    assert isinstance(d, MultiTaskDiscriminator)
    maps = d.trunk(x)
    assert torch.equal(d(x, 2), maps[:, 2:3])
    assert torch.equal(d(x, torch.tensor([0, 2])), torch.stack([maps[0, :1], maps[1, 2:3]]))
    mapping = build_network(MAPPING_NETWORKS, "mlp", "mapping network", latent_dim=5,
                            style_dim=3, domains=3)
    encoder = build_network(STYLE_ENCODERS, "conv", "style encoder", features=4, style_dim=3,
                            domains=3)
    assert mapping(torch.randn(2, 5), 1).shape == encoder(x, torch.tensor([0, 1])).shape == (2, 3)
    with pytest.raises(ValueError, match="known: mlp"):
        build_network(MAPPING_NETWORKS, "vgg", "mapping network")


def test_train_multidomain_keeps_each_domains_reference_style(models: Path, data: Path,
                                                              capsys) -> None:
    loaded = load_model_folder(models / "md")  # sha256 and styles checked
    info = loaded.info
    assert info.multidomain and [d.name for d in info.styles] == list(DOMAINS)
    assert info.params["domains"] == 3 and info.params["style_dim"] == 4
    assert torch.allclose(loaded.generator.styles, torch.tensor([d.style for d in info.styles]))
    assert len({d.style for d in info.styles}) == 3  # every domain its own reference
    assert info.styles[0].tags["Manufacturer"] == "SIEMENS" and info.styles[0].series == 2
    assert info.styles[2].tags["Manufacturer"] == "CANON_MEC"
    assert info.training["mode"] == "multidomain" and info.training["options"]["diversity"] == 0
    for name in ("losses.png", "comparison.png", "histograms.png", "metrics.json"):
        assert (models / "md" / "report" / name).is_file()
    capsys.readouterr()
    assert main(["models", "list", "--models-dir", str(models)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("md\t1.0\tany -> siemens-3t-t1w | ge-1.5t-t1w | canon-1.5t-t1w"
                           " (multi-domain)\t")
    # one line for user mistakes
    rc = main(["train", "multidomain", "--domain", f"a={data / DOMAINS[0]}", "--name", "x",
               "--models-dir", str(models), *TINY])
    assert rc == 2 and "at least two --domain" in capsys.readouterr().err
    rc = main(["train", "multidomain", *_domains(data), "--name", "x", "--models-dir",
               str(models), "--architecture", "unet", *TINY])
    assert rc == 2 and "not a style generator" in capsys.readouterr().err


def _config(tmp_path: Path, models: Path, route: str) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\nmodels_dir = "{models}"\n'
                      + route)
    return config


ROUTE = """
[[routes]]
name = "mr-to-siemens"
model = "md"
{extra}
[routes.match]
Modality = "MR"
"""


def test_a_route_names_the_target_domain(models: Path, data: Path, tmp_path: Path,
                                         capsys) -> None:
    config = _config(tmp_path, models, ROUTE.format(extra='target_domain = "siemens-3t-t1w"'))
    assert main(["route", str(data / "canon-1.5t-t1w" / "s0"), "--explain", "--config",
                 str(config)]) == 0
    out = capsys.readouterr().out
    assert "route mr-to-siemens (model md, target domain siemens-3t-t1w)" in out
    assert "-> converted to domain siemens-3t-t1w (model md: reference style of 2 training" \
           " series; Modality=MR, Manufacturer=SIEMENS" in out
    routes = load_config(config).routes
    files = sorted((data / "canon-1.5t-t1w" / "s0").glob("*.dcm"))
    outcome = harmonise_series(files, routes=routes, models_dir=models,
                               out_dir=tmp_path / "out", cache=ModelCache(1))
    assert outcome.status == "harmonised" and outcome.reason.endswith("to domain siemens-3t-t1w")
    derived = dcmread(outcome.outputs[0])
    block = derived.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    parameters = json.loads(block[0x14].value)
    siemens = read_model_info(models / "md").styles[0]
    assert parameters["target_domain"] == "siemens-3t-t1w"
    assert parameters["style"] == list(siemens.style)
    assert "to domain siemens-3t-t1w via route mr-to-siemens" in derived.DerivationDescription
    # the same series to another domain is another derived series
    other = harmonise_series(files, routes=[], models_dir=models, out_dir=tmp_path / "out",
                             model_name="md", target_domain="ge-1.5t-t1w", cache=ModelCache(1))
    assert other.derived_series_uid != outcome.derived_series_uid
    assert main(["harmonise", str(files[0].parent), str(tmp_path / "h"), "--config",
                 str(config), "--model", "md"]) == 1
    assert "multi-domain: name the domain" in capsys.readouterr().err

    # at load: a multi-domain route names one of its model's domains, and only such a route
    for extra, message in (("", "model 'md' is multi-domain: name the domain to convert to"
                                " (target_domain; one of siemens-3t-t1w, ge-1.5t-t1w,"
                                " canon-1.5t-t1w)"),
                           ('target_domain = "philips"', "model 'md' has no domain 'philips'"
                                                         " (known: siemens-3t-t1w, ge-1.5t-t1w,"
                                                         " canon-1.5t-t1w)")):
        with pytest.raises(ConfigError) as error:
            load_config(_config(tmp_path, models, ROUTE.format(extra=extra)))
        assert str(error.value) == f"{tmp_path / 'node.toml'}: route 'mr-to-siemens': {message}"
    make_plain_model(models, "pairwise")
    bad = ROUTE.format(extra='target_domain = "siemens-3t-t1w"').replace('"md"', '"pairwise"')
    with pytest.raises(ConfigError, match="route 'mr-to-siemens': model 'pairwise' is not"
                                          " multi-domain"):
        load_config(_config(tmp_path, models, bad))
    shutil.rmtree(models / "pairwise")


@pytest.mark.usefixtures("fast_evaluate")
def test_evaluate_every_ordered_pair(models: Path, data: Path, tmp_path: Path, capsys) -> None:
    """Two of the model's three domains: both ordered pairs, a 2-way scanner classifier."""
    report = tmp_path / "report"
    pair_of = [a for d in ("ge-1.5t-t1w", "canon-1.5t-t1w") for a in ("--domain",
                                                                       f"{d}={data / d}")]
    assert main(["evaluate", "--model", str(models / "md"), *pair_of, "--report",
                 str(report)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["domains"] == ["ge-1.5t-t1w", "canon-1.5t-t1w"]
    assert set(result["pairs"]) == {"ge-1.5t-t1w -> canon-1.5t-t1w",
                                    "canon-1.5t-t1w -> ge-1.5t-t1w"}
    accuracy = result["scanner_accuracy"]
    assert accuracy["chance"] == 0.5 and set(accuracy["after"]) == set(result["domains"])
    assert all(0 <= v <= 1 for v in [accuracy["before"], *accuracy["after"].values()])
    pair = result["pairs"]["ge-1.5t-t1w -> canon-1.5t-t1w"]
    assert pair["target_domain"] == "canon-1.5t-t1w" and pair["paired"]
    for side in ("before", "after"):
        assert 0 <= pair["reproducible_share"][side]["overall"] <= 1
        assert 0 <= pair["feature_stats"]["share_small_d"][side] <= 1
        assert set(pair["downstream_dice"][side]) == {"GM", "WM", "CSF", "mean"}
    feature = next(iter(pair["feature_stats"]["features"].values()))
    assert set(feature["after"]) == {"levene_p", "welch_p", "cohen_d"}
    assert pair["downstream_dice"]["target"]["mean"] > 0.5  # the target's own, fitted on it
    assert pair["baseline"]["downstream_dice"]["after"]["mean"] >= 0
    assert len(result["table"]) == 2 and (report / "table.md").is_file()
    assert (report / "to-canon-1.5t-t1w.png").is_file()
    # --source/--target: a multi-domain model needs the domain to convert to
    rc = main(["evaluate", "--model", str(models / "md"), "--source",
               str(data / "ge-1.5t-t1w"), "--target", str(data / "siemens-3t-t1w")])
    assert rc == 2 and "name the domain to convert to" in capsys.readouterr().err
    rc = main(["evaluate", "--model", str(models / "md"), "--domain", f"x={data}",
               "--domain", f"siemens-3t-t1w={data / 'siemens-3t-t1w'}"])
    assert rc == 2 and "at least two of the model's domains" in capsys.readouterr().err


@pytest.mark.usefixtures("fast_evaluate")
def test_identical_domains_score_as_one(models: Path, data: Path) -> None:
    """Known answers: a source that is the target itself, left as it is, has every feature
    reproducible, no feature distribution shifted (d = 0, no test significant) and the
    target's tissue Dice."""
    series = load_series_dir(data / "siemens-3t-t1w", lambda _: None)
    info = read_model_info(models / "md")
    result = score(info, series, series, [s.volume.array for s in series], log=lambda _: None,
                   target_domain="siemens-3t-t1w")
    assert result["ssim"]["after"] == pytest.approx(1.0)
    assert result["reproducible_share"]["after"]["overall"] == 1.0
    stats = result["feature_stats"]
    assert stats["share_small_d"]["after"] == 1.0
    assert all(f["after"]["cohen_d"] == 0 for f in stats["features"].values())
    assert stats["welch_not_significant"]["after"] == 1.0
    dice_after = result["downstream_dice"]["after"]["mean"]
    assert dice_after == pytest.approx(result["downstream_dice"]["before"]["mean"])
    assert dice_after >= result["downstream_dice"]["target"]["mean"] - 0.02  # in-sample


def test_feature_statistics_and_shares_on_known_samples() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 400)
    a -= a.mean()
    assert cohen_d(a, a) == 0 and cohen_d(a + 1, a) == pytest.approx(1 / a.std(ddof=1))
    stats = compare_features({"firstorder_x": a + 1.0, "glcm_y": a * 3}, {"firstorder_x": a,
                                                                           "glcm_y": a})
    assert stats["firstorder_x"]["welch_p"] < 1e-6 and stats["firstorder_x"]["levene_p"] > 0.5
    assert stats["glcm_y"]["levene_p"] < 1e-6 and abs(stats["glcm_y"]["cohen_d"]) < 1e-9
    assert feature_summary(stats) == {"small_d": 0.5, "levene_not_significant": 0.5,
                                      "welch_not_significant": 0.5}
    cccs = feature_ccc({"firstorder_x": a, "glcm_y": a + rng.normal(0, 1, 400)},
                       {"firstorder_x": a, "glcm_y": a})
    share = reproducible_share(cccs)
    assert share["firstorder"] == 1.0 and share["glcm"] == 0.0 and share["overall"] == 0.5


def test_tissue_truth_and_segmentation(data: Path, tmp_path: Path) -> None:
    siemens = load_series_dir(data / "siemens-3t-t1w", lambda _: None)
    truth = [simulated_truth(s) for s in siemens]
    assert truth[0].shape == siemens[0].volume.array.shape
    assert set(np.unique(truth[0])) == {0, 1, 2, 3}
    images = [metric_units(s.volume.array, "MR") for s in siemens]
    model = TissueModel.fit(images[1:], truth[1:])
    scores = dice(model.predict(images[0], siemens[0].mask), truth[0], CLASSES["MR"])
    assert scores["mean"] > 0.6 and scores["WM"] > scores["CSF"] * 0.5
    assert dice(truth[0], truth[0], CLASSES["MR"])["mean"] == 1.0
    write_series(tmp_path / "other", modality="MR", slices=3, size=32)  # not simulated
    assert simulated_truth(load_series_dir(tmp_path / "other", lambda _: None)[0]) is None


SITE = """
[[routes]]
name = "mr-to-siemens"
model = "md"
target_domain = "siemens-3t-t1w"
[routes.match]
Modality = "MR"
[routes.domains."siemens-3t-t1w"]
Manufacturer = "SIEMENS"
[routes.domains."ge-1.5t-t1w"]
Manufacturer = "GE*"
"""


@pytest.mark.usefixtures("fast_evaluate")
def test_train_site_retrains_a_multidomain_route(models: Path, data: Path, tmp_path: Path,
                                                 capsys) -> None:
    for domain in DOMAINS:  # Canon's series arrive too; the route's tables leave them out
        shutil.copytree(data / domain, tmp_path / "var" / "spool" / domain)
    site_models = tmp_path / "models"
    shutil.copytree(models / "md", site_models / "md")
    config = _config(tmp_path, site_models, SITE)
    rc = main(["train", "site", "--route", "mr-to-siemens", "--config", str(config),
               "--workdir", str(tmp_path / "run"), *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "route 'mr-to-siemens': 3 siemens-3t-t1w, 3 ge-1.5t-t1w series" in out
    assert "training multidomain stargan as md-v1.1" in out
    new = read_model_info(site_models / "md-v1.1")
    assert [d.name for d in new.styles] == list(DOMAINS[:2]) and new.params["style_dim"] == 4
    comparison = json.loads((site_models / "md-v1.1" / "report" /
                             "site-comparison.json").read_text())
    assert comparison["score"] == "scanner_accuracy to siemens-3t-t1w: distance from chance"
    assert comparison["deployed"]["model"] == "md" and isinstance(comparison["new_is_better"],
                                                                  bool)
    no_tables = SITE[:SITE.index("[routes.domains")]
    rc = main(["train", "site", "--route", "mr-to-siemens", "--config",
               str(_config(tmp_path, site_models, no_tables)), *TINY])
    assert rc == 2 and "no [routes.domains.NAME] tables" in capsys.readouterr().err
