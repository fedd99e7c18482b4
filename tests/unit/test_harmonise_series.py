"""harmonise_series outcomes and failures, the model cache, and the offline commands."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
import torch
from pydicom import config, dcmread
from torch import nn

from dicomnode.cli import main
from pipelines import harmonise as harmonise_module
from pipelines import inference
from pipelines.derived import PRIVATE_CREATOR, PRIVATE_GROUP
from pipelines.errors import InferenceError, ModelError
from pipelines.harmonise import ModelCache, harmonise_series
from pipelines.inference import InferenceSettings
from pipelines.model_folder import WEIGHTS_FILE, save_model_folder
from pipelines.networks import GENERATORS
from pipelines.routing import parse_routes, route_series
from tests.dicom_factory import raw_data, write_series
from tests.model_factory import CT_NORM, make_model

ROUTES = parse_routes([{"name": "ct", "model": "smooth", "match": {"Modality": "CT",
                                                                    "ConvolutionKernel": "B7*"}}])
FAST = InferenceSettings(device="cpu", bf16=False)


@pytest.fixture
def setup(tmp_path):
    make_model(tmp_path / "models", "smooth")
    return tmp_path, write_series(tmp_path / "in" / "ct", slices=3, size=32)


def run(tmp_path, files, **kw):
    kw.setdefault("routes", ROUTES)
    kw.setdefault("options", FAST)
    return harmonise_series(files, models_dir=tmp_path / "models", out_dir=tmp_path / "out",
                            cache=ModelCache(), **kw)


def test_harmonised_outcome_names_route_model_and_outputs(setup):
    tmp_path, files = setup
    outcome = run(tmp_path, files)
    assert outcome.status == "harmonised" and outcome.route == "ct"
    assert outcome.model.name == "smooth" and outcome.model.version == "1.0"
    assert len(outcome.model.sha256) == 64
    assert all(p.parent.name == outcome.derived_series_uid for p in outcome.outputs)
    assert set(outcome.seconds) == {"load", "inference", "write"}
    assert outcome.reason == "harmonised 3 images with smooth 1.0"


def test_unmatched_series(tmp_path):
    files = write_series(tmp_path / "in", kernel="B30f", slices=2, size=16)
    outcome = run(tmp_path, files)
    assert (outcome.status, outcome.reason) == ("unmatched", "no route matches")
    assert not (tmp_path / "out").exists()


def test_inconsistent_routing_tags_are_rejected(tmp_path):
    def mixed(ds, i):
        ds.ConvolutionKernel = "B70f" if i else "B30f"
    files = write_series(tmp_path / "in", slices=2, size=16, edit=mixed)
    outcome = run(tmp_path, files)
    assert outcome.status == "rejected"
    assert "ConvolutionKernel differs across images" in outcome.reason


def test_bad_geometry_is_rejected_with_the_series_reason(setup):
    tmp_path, _ = setup
    def dup(ds, i):
        ds.ImagePositionPatient = [0, 0, 0]
    files = write_series(tmp_path / "dup", slices=2, size=16, edit=dup)
    outcome = run(tmp_path, files)
    assert outcome.status == "rejected" and outcome.reason.startswith("duplicate slice positions")
    assert outcome.model.name == "smooth"


def test_model_for_another_modality_is_rejected(setup):
    tmp_path, _ = setup
    files = write_series(tmp_path / "mr", modality="MR", slices=2, size=16)
    outcome = run(tmp_path, files, model_name="smooth")
    assert (outcome.status, outcome.reason) == ("rejected", "model 'smooth' is for CT, series"
                                                " is MR")


def test_forced_route_and_model(setup):
    tmp_path, _ = setup
    files = write_series(tmp_path / "soft", kernel="B30f", slices=2, size=16)
    assert run(tmp_path, files, route_name="ct").status == "harmonised"
    forced = run(tmp_path, files, model_name="smooth")
    assert forced.status == "harmonised" and forced.route is None
    with pytest.raises(ValueError, match="no route named 'nope'"):
        run(tmp_path, files, route_name="nope")


def test_tampered_weights_raise_model_error(setup):
    tmp_path, files = setup
    with (tmp_path / "models" / "smooth" / WEIGHTS_FILE).open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(ModelError, match="does not match model.json"):
        run(tmp_path, files)


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(nn.init.ones_(nn.Parameter(__import__("torch").empty(1))))

    def forward(self, x):
        raise RuntimeError("CUDA error: device-side assert triggered")


def test_failing_model_raises_a_clear_inference_error(setup, monkeypatch):
    tmp_path, files = setup
    monkeypatch.setitem(GENERATORS, "exploding", Exploding)
    save_model_folder(tmp_path / "models" / "smooth", Exploding(), name="smooth", version="2",
                      architecture="exploding", params={}, source={}, target={},
                      normalisation=CT_NORM)
    with pytest.raises(InferenceError, match="model 'smooth': failed on cpu: CUDA error"):
        run(tmp_path, files)


def test_model_cache_reuses_and_reloads_on_new_weights(tmp_path):
    folder = make_model(tmp_path, "smooth")
    cache = ModelCache(capacity=1)
    first = cache.get(folder)
    assert cache.get(folder) is first
    make_model(tmp_path, "smooth", layers=2)
    assert cache.get(folder) is not first
    assert cache.get(make_model(tmp_path, "other")) is not None  # evicts, within capacity


def config_for(tmp_path, route_kernel="B7*"):
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\nmodels_dir = "{tmp_path / "models"}"\n[inference]\nbf16 = false\n'
                    f'[[routes]]\nname = "ct"\nmodel = "smooth"\n[routes.match]\n'
                    f'ConvolutionKernel = "{route_kernel}"\n')
    return str(path)


def test_harmonise_command_reports_each_series(setup, capsys):
    tmp_path, _ = setup
    write_series(tmp_path / "in" / "soft", kernel="B30f", slices=2, size=16)
    config = config_for(tmp_path)
    assert main(["harmonise", str(tmp_path / "in"), str(tmp_path / "cli-out"),
                 "--config", config]) == 0
    out = capsys.readouterr().out
    assert "harmonised -> " in out and "unmatched: no route matches (left out)" in out
    def dup(ds, i):
        ds.ImagePositionPatient = [0, 0, 0]
    write_series(tmp_path / "in" / "dup", slices=2, size=16, edit=dup)
    assert main(["harmonise", str(tmp_path / "in"), str(tmp_path / "cli-out"),
                 "--config", config, "--model", "smooth"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": rejected: duplicate slice positions" in err[0]
    assert main(["harmonise", str(tmp_path / "in"), str(tmp_path / "x"), "--config", config,
                 "--route", "nope"]) == 2
    assert "no route named 'nope'" in capsys.readouterr().err


def test_models_list_command(tmp_path, capsys):
    make_model(tmp_path / "models", "smooth")
    make_model(tmp_path / "models", "mr", modality="MR", version="2.1")
    assert main(["models", "list", "--models-dir", str(tmp_path / "models")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:3] for line in lines] == [
        ["mr", "2.1", "mr-sharp -> mr-smooth"], ["smooth", "1.0", "ct-sharp -> ct-smooth"]]
    assert all(len(line.split("\t")[3]) == 12 for line in lines)


def test_harmonise_command_reports_any_failure_in_one_line_and_carries_on(setup, capsys,
                                                                          monkeypatch):
    tmp_path, files = setup
    write_series(tmp_path / "in" / "other", slices=2, size=16, seed=3)
    real = harmonise_module.harmonise_series
    def flaky(series_files, **kw):
        if series_files == files:
            raise KeyError("RescaleSlope")  # not a PipelineError: a bug or an odd header
        return real(series_files, **kw)
    monkeypatch.setattr(harmonise_module, "harmonise_series", flaky)
    assert main(["harmonise", str(tmp_path / "in"), str(tmp_path / "cli-out"),
                 "--config", config_for(tmp_path)]) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.endswith(": failed: KeyError: 'RescaleSlope'")
    assert captured.out.count("harmonised -> ") == 1


def test_derived_series_is_never_harmonised_again(setup, capsys):
    """A re-run over the output folder, or a PACS sending harmonised copies back."""
    tmp_path, files = setup
    first = run(tmp_path, files)
    for forced in ({}, {"route_name": "ct"}, {"model_name": "smooth"}):
        again = run(tmp_path, list(first.outputs), **forced)
        assert (again.status, again.reason) == ("unmatched",
                                                "already harmonised by dicomnode (smooth 1.0)")
    config = config_for(tmp_path)
    assert main(["harmonise", str(tmp_path / "out"), str(tmp_path / "out"),
                 "--config", config]) == 0
    assert "unmatched: already harmonised by dicomnode (smooth 1.0) (left out)" in \
        capsys.readouterr().out
    assert [p.name for p in (tmp_path / "out").iterdir()] == [first.derived_series_uid]
    assert main(["route", "--explain", str(tmp_path / "out"), "--config", config]) == 0
    out = capsys.readouterr().out
    assert "already harmonised by dicomnode (smooth 1.0) (unmatched = archive)" in out
    assert "  ! already harmonised by dicomnode (smooth 1.0): no rule is tried" in out


def test_a_scout_series_is_left_unmatched_whatever_the_route(setup, capsys):
    """A scanner's scout (topogram) series carries the kernel and vendor a route matches,
    but there is no volume to harmonise: unmatched and archived, not a rejected job."""
    tmp_path, _ = setup

    def scout(ds, i):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    files = write_series(tmp_path / "scout", slices=2, size=16, edit=scout)
    for forced in ({}, {"route_name": "ct"}, {"model_name": "smooth"}):
        outcome = run(tmp_path, files, **forced)
        assert (outcome.status, outcome.reason) == (
            "unmatched", "not harmonisable: localiser images only")
    assert main(["route", "--explain", str(tmp_path / "scout"),
                 "--config", config_for(tmp_path)]) == 0
    assert "  ! not harmonisable: localiser images only: no rule is tried" in \
        capsys.readouterr().out


def test_a_raw_data_object_in_the_series_is_set_aside(setup, capsys):
    """Philips MR scanners put Raw Data objects in the image series (same series UID, none
    of the images' tags): the images are routed and harmonised, the object named."""
    tmp_path, files = setup
    raw = tmp_path / "in" / "ct" / "raw.dcm"
    raw_data(dcmread(files[0])).save_as(raw, enforce_file_format=True)
    outcome = run(tmp_path, [raw, *files])
    assert (outcome.status, outcome.route, len(outcome.outputs)) == ("harmonised", "ct", 3)
    aside = "set aside 1 instance(s) that are not grayscale images: Raw Data Storage"
    assert outcome.warnings == (aside,)
    assert outcome.reason == f"harmonised 3 images with smooth 1.0 ({aside})"
    assert main(["route", "--explain", str(tmp_path / "in"),
                 "--config", config_for(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(4 instances): route ct (model smooth)" in out
    assert f"  - {aside}; the rules see the others" in out


def test_rerun_writes_identical_bytes_and_records_the_precision(setup, monkeypatch):
    """Same model, machine, cache and processing time: the same bytes, even when the CPU's
    timings would now pick the other precision."""
    tmp_path, files = setup
    cache, when = tmp_path / "var" / "execution.json", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    outputs = []
    for faster in (torch.bfloat16, None):
        monkeypatch.setattr(inference, "_seconds", lambda g, x, d, s, execution, f=faster:
                            1.0 if inference.PRECISIONS[execution.precision] == f else 2.0)
        outcome = run(tmp_path, files, options=InferenceSettings(device="cpu"),
                      execution_cache=cache, when=when)
        assert outcome.precision == "bf16"
        outputs.append({p.name: p.read_bytes() for p in outcome.outputs})
    assert outputs[0] == outputs[1]
    block = dcmread(outcome.outputs[0]).private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert json.loads(block[0x14].value)["inference"] == {"device": "cpu", "precision": "bf16",
                                                          "tile": 0}


def test_load_time_includes_headers_and_routing(setup, monkeypatch):
    """The benchmark's load share must not leave out reading headers and routing."""
    tmp_path, files = setup
    def slow(datasets, routes):
        time.sleep(0.2)
        return route_series(datasets, routes)
    monkeypatch.setattr(harmonise_module, "route_series", slow)
    assert run(tmp_path, files).seconds["load"] >= 0.2


def test_offline_files_are_taken_by_the_rule_the_node_receives_by(setup):
    """What the node would refuse over the network (a truncated file) is left out offline,
    and said; what it takes (UIDs with leading zeros) is harmonised."""
    tmp_path, files = setup
    cut = files[-1].read_bytes()
    files[-1].write_bytes(cut[:len(cut) - 100])
    outcome = run(tmp_path, files)
    assert outcome.status == "harmonised" and len(outcome.outputs) == 2
    assert f"left out {files[-1].name}: (7FE0,0010) declares" in outcome.reason
    only_broken = run(tmp_path, files[-1:])
    assert only_broken.status == "rejected" and "(7FE0,0010) declares" in only_broken.reason

    def leading_zero(ds, i):
        ds.SeriesInstanceUID = "1.2.840.113619.2.055.3.1"
    with config.disable_value_validation():
        odd = write_series(tmp_path / "odd", slices=2, size=16, edit=leading_zero)
    assert run(tmp_path, odd).status == "harmonised"
