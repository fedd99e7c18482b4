"""What a generator costs per slice (pipelines.cost), as model.json records and validates it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipelines.cost import gflop, slice_cost
from pipelines.errors import ModelError
from pipelines.model_folder import read_model_info, save_model_folder
from pipelines.networks import PlainResidualCNN, SpectralFilter
from tests.model_factory import random_generator

CT = {"name": "siemens-b70f", "Modality": "CT"}
NORM = {"kind": "hu_window", "low": -1024, "high": 3071}


def test_convolutions_count_two_operations_per_multiply_add() -> None:
    """Three 3x3 convolutions (1->4, 4->4, 4->1) on a 64 x 48 slice, by hand."""
    net = PlainResidualCNN(features=4, blocks=3)
    macs = 9 * (1 * 4 + 4 * 4 + 4 * 1) * 64 * 48
    assert gflop(net, 64, 48) == pytest.approx(2 * macs / 1e9, rel=1e-12)


def test_fft_counts_two_and_a_half_n_log_n_per_real_transform() -> None:
    """The spectral filter pads a 512² slice by its reach (22 px) and to 576 = 2^6 x 3^2:
    one real FFT forward and one back on 576² points."""
    net = SpectralFilter(knots=16)
    points = 576 * 576
    assert net.padding(512, 512) == (22, 42, 22, 42)
    assert gflop(net, 512, 512) == pytest.approx(2 * 2.5 * points * math.log2(points) / 1e9,
                                                 rel=1e-6)


def test_model_json_records_the_cost_at_the_clinical_matrix_and_validates_it(tmp_path) -> None:
    net = random_generator("plain", features=4, blocks=3)
    folder = save_model_folder(tmp_path / "m", net, name="m", version="1",
                               architecture="plain", params={"features": 4, "blocks": 3},
                               source=CT, target=CT, normalisation=NORM)
    info = read_model_info(folder)
    assert info.cost == slice_cost(net, "CT") == {
        "gflop_per_slice": float(f"{2 * 9 * 24 * 512 * 512 / 1e9:.4g}"), "slice": [512, 512]}
    meta = json.loads((folder / "model.json").read_text())
    for bad in ({"gflop_per_slice": -1, "slice": [512, 512]},
                {"gflop_per_slice": 1.0, "slice": [512]},
                {"gflop_per_slice": "1", "slice": [512, 512]}, [1.0]):
        (folder / "model.json").write_text(json.dumps({**meta, "cost": bad}))
        with pytest.raises(ModelError, match="cost"):
            read_model_info(folder)


def test_three_dimensional_generators_record_no_slice_cost(tmp_path) -> None:
    net = random_generator("plain", features=4, blocks=3, dims=3)
    folder = save_model_folder(tmp_path / "m", net, name="m", version="1", architecture="plain",
                               params={"features": 4, "blocks": 3, "dims": 3}, source=CT,
                               target=CT, normalisation=NORM)
    assert read_model_info(folder).cost is None
    assert "cost" not in json.loads((folder / "model.json").read_text())
    assert torch.is_grad_enabled()  # counting left autograd as it found it
