"""The shipped config and models work together out of the box.

Every route of ``conf/node.toml`` names a model folder that loads (sha256 verified), stays
within the size limit, costs what its model.json says and carries its training and
evaluation reports; a simulated series of the model's source scanner, at each matrix the
model is evaluated at, is routed there by the shipped rules and comes out as valid DICOM
that agrees better with the same anatomy seen by the target scanner.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dicomnode.config import load_config
from pipelines.cost import slice_cost
from pipelines.harmonise import ModelCache, harmonise_series
from pipelines.inference import InferenceSettings
from pipelines.model_folder import load_model_folder
from pipelines.routing import route_series
from pipelines.series import load_series, read_headers
from tests import ROOT
from trainers.data import body_mask
from trainers.metrics import metric_units, rmse
from trainers.ship_models import MODELS
from trainers.simulation import simulate_series

CONFIG = load_config(ROOT / "conf" / "node.toml")
ROUTES = {route.name: route for route in CONFIG.routes}
MAX_BYTES = 10 * 1024 * 1024
SUBJECT = 123  # a subject none of the shipped models trained or was evaluated on
# (route, report): the matrices each route's model is evaluated at, where routing sends it
ROUTED = sorted((name, report) for name, route in ROUTES.items()
                for report in MODELS[route.model].reports)


def _folder(route: str) -> Path:
    return CONFIG.node.models_dir / ROUTES[route].model


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_route_model_loads_within_size_and_has_reports(route):
    folder = _folder(route)
    loaded = load_model_folder(folder)
    assert sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) <= MAX_BYTES
    # what model.json says the model costs is what it costs
    assert loaded.info.cost == slice_cost(loaded.generator, loaded.info.source["Modality"])
    training = json.loads((folder / "report" / "metrics.json").read_text())
    assert training["steps"] > 0
    for report in MODELS[ROUTES[route].model].reports:  # held out where it is routed
        evaluation = json.loads((folder / "report" / report / "metrics.json").read_text())
        assert evaluation["weights_sha256"] == loaded.info.weights_sha256
        assert evaluation["model"] == loaded.info.name == ROUTES[route].model


@pytest.mark.parametrize(("route", "report"), ROUTED)
def test_simulated_source_is_routed_harmonised_valid_and_closer_to_target(route, report,
                                                                         tmp_path):
    """At each matrix the models are evaluated at (128, and the modality's clinical one:
    CT 512, MR 256): pixel size changes the noise per pixel and the scale of anatomy, and
    the MR routes split by it."""
    info = load_model_folder(_folder(route)).info
    modality = info.source["Modality"]
    spec = MODELS[ROUTES[route].model]  # a multi-domain model: a scanner its route takes
    assert ROUTES[route].target_domain in (None, spec.target)
    source = simulate_series(modality, spec.source, tmp_path / "source",
                             subject=SUBJECT, slices=4, size=spec.sizes()[report], progress=False)
    target = simulate_series(modality, spec.target, tmp_path / "target",
                             subject=SUBJECT, slices=4, size=spec.sizes()[report], progress=False)
    outcome = harmonise_series(source, routes=CONFIG.routes, models_dir=CONFIG.node.models_dir,
                               out_dir=tmp_path / "out", cache=ModelCache(),
                               options=InferenceSettings(device="cpu", bf16=False))
    assert (outcome.status, outcome.route) == ("harmonised", route), outcome.reason
    assert len(outcome.outputs) == 4

    if shutil.which("dciodvfy"):
        result = subprocess.run(["dciodvfy", str(outcome.outputs[0])], capture_output=True,
                                text=True)
        errors = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == []

    before, after, truth = (metric_units(load_series(files).array, modality)
                            for files in (source, outcome.outputs, target))
    mask = body_mask(load_series(target).array, modality)
    assert np.isfinite(after).all()
    closer = rmse(after, truth, mask) < rmse(before, truth, mask)
    # Known and reported (docs/models/ct-vendor-ge-to-siemens.md; the model's
    # report/evaluation-clinical): at 512x512 the vendor model gives GE's images Siemens'
    # noise texture, and so Siemens' noise power, which another Siemens acquisition does
    # not share pixel for pixel (held out: PSNR 39.8 -> 39.2 dB, while the classifier goes
    # from 0.97 to 0.55). Should that change, this fails: update that page and make it an
    # ordinary case.
    known_short = (route, report) == ("ct-ge-to-siemens", "evaluation-clinical")
    assert closer is not known_short


@pytest.mark.parametrize("changes", [
    {"ScanningSequence": "GR", "SequenceVariant": "SP"},                    # SPGR, BRAVO
    {"ScanningSequence": ["SE", "IR"], "RepetitionTime": 2200, "InversionTime": 860},  # FLAIR
    {"RepetitionTime": 2500, "EchoTime": 20},                               # proton density
])
def test_shipped_mr_routes_take_only_the_t1_spin_echo_their_models_learnt(changes, tmp_path):
    files = simulate_series("MR", "ge-1.5t-t1w", tmp_path, subject=SUBJECT, slices=2,
                            size=128, progress=False)
    headers = read_headers(files)
    assert route_series(headers, CONFIG.routes).route.name == "mr-t1w-ge15-to-siemens3-coarse"
    for header in headers:
        for keyword, value in changes.items():
            setattr(header, keyword, value)
    decision = route_series(headers, CONFIG.routes)
    assert decision.route is None, decision.explain()
