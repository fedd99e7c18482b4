"""The companion algorithm SR (TID 1500 + TID 4019): content, references, UIDs, validators, CLI."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest
from pydicom import Dataset, dcmread

from dicomnode.cli import main
from pipelines import IMPLEMENTATION_CLASS_UID
from pipelines.harmonise import ModelCache, harmonise_series
from pipelines.inference import InferenceSettings
from pipelines.routing import parse_routes
from pipelines.sr import sr_uids
from tests.dicom_factory import write_series
from tests.model_factory import make_model
from trainers.simulation import simulate_series

ROUTES = parse_routes([{"name": "ct", "model": "smooth", "match": {"Modality": "CT"}}])
FAST = InferenceSettings(device="cpu", bf16=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    make_model(root / "models", "smooth")
    cases = {"single": write_series(root / "in" / "single", slices=3, size=32),
             "enhanced": simulate_series("CT", "siemens-b30f", root / "in" / "enhanced",
                                         slices=3, size=32, enhanced=True, progress=False)}
    outcomes = {name: harmonise_series(files, routes=ROUTES, models_dir=root / "models",
                                       out_dir=root / "out", options=FAST, cache=ModelCache(),
                                       sr=True)
                for name, files in cases.items()}
    return root, cases, outcomes


def items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of the SR tree, depth first."""
    for item in ds.get("ContentSequence") or []:
        yield item
        yield from items(item)


def text(ds: Dataset, code: str) -> list[str]:
    return [str(i.TextValue) for i in items(ds)
            if i.ConceptNameCodeSequence[0].CodeValue == code and "TextValue" in i]


@pytest.mark.parametrize("case", ["single", "enhanced"])
def test_report_names_the_algorithm_and_references_the_derived_series(run, case):
    _, _, outcomes = run
    outcome = outcomes[case]
    sr = dcmread(outcome.report)
    derived = [dcmread(p, stop_before_pixels=True) for p in outcome.outputs]
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID  # not highdicom's
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == sr_uids(outcome.derived_series_uid)
    assert sr.StudyInstanceUID == derived[0].StudyInstanceUID
    assert sr.PatientID == derived[0].PatientID
    assert text(sr, "111001") == ["smooth"]  # Algorithm Name
    assert text(sr, "111003") == ["1.0"]  # Algorithm Version
    assert f"weights sha256 {outcome.model.sha256}" in text(sr, "111002")
    assert "route ct" in text(sr, "111002")
    referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items(sr)
                  if i.ValueType == "IMAGE"}
    assert referenced == {d.SOPInstanceUID for d in derived}
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == outcome.derived_series_uid


@pytest.mark.skipif(not (shutil.which("dciodvfy") and shutil.which("dcentvfy")),
                    reason="no dicom3tools")
@pytest.mark.parametrize("case", ["single", "enhanced"])
def test_dciodvfy_and_dcentvfy_report_no_errors(run, case):
    _, cases, outcomes = run
    outcome = outcomes[case]
    for command in (["dciodvfy", str(outcome.report)],
                    ["dcentvfy", str(outcome.report), *map(str, outcome.outputs),
                     *map(str, cases[case])]):
        result = subprocess.run(command, capture_output=True, text=True)
        errors = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == [], command[0]


def test_rerun_replaces_the_same_report(run):
    root, cases, outcomes = run
    again = harmonise_series(cases["single"], routes=ROUTES, models_dir=root / "models",
                             out_dir=root / "out", options=FAST, sr=True)
    assert again.report == outcomes["single"].report
    assert list(again.report.parent.iterdir()) == [again.report]


def test_no_report_unless_asked(run):
    root, cases, _ = run
    outcome = harmonise_series(cases["single"], routes=ROUTES, models_dir=root / "models",
                               out_dir=root / "plain", options=FAST)
    assert outcome.report is None
    assert [p.name for p in (root / "plain").iterdir()] == [outcome.derived_series_uid]


def test_harmonise_command_sr_flag(run, capsys):
    root, _, _ = run
    config = root / "node.toml"
    config.write_text(f'[node]\nmodels_dir = "{root / "models"}"\n[inference]\nbf16 = false\n'
                      '[[routes]]\nname = "ct"\nmodel = "smooth"\n[routes.match]\n'
                      'Modality = "CT"\n')
    assert main(["harmonise", str(root / "in" / "single"), str(root / "cli"), "--config",
                 str(config), "--sr"]) == 0
    out = capsys.readouterr().out
    derived_uid = out.split(" -> ")[1].split()[0]
    sr_series = sr_uids(derived_uid)[0]
    assert f"(report {sr_series})" in out
    assert (root / "cli" / sr_series).is_dir()
