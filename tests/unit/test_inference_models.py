"""Model folders: round trip, sha256 refusal, listing, validation messages."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.errors import ModelError
from pipelines.model_folder import (
    MODEL_JSON,
    WEIGHTS_FILE,
    list_model_folders,
    load_model_folder,
    read_model_info,
    save_model_folder,
)
from tests.model_factory import CT_NORM, Smoother, make_model


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    folder = make_model(tmp_path, "ct-smooth", layers=2)
    meta = json.loads((folder / MODEL_JSON).read_text())
    for key in ("name", "version", "architecture", "params", "source", "target", "normalisation",
                "training", "validation", "created", "software_version", "weights_sha256"):
        assert key in meta
    loaded = load_model_folder(folder)
    assert loaded.info.name == "ct-smooth" and loaded.info.dims == 2
    assert loaded.info.domains == "ct-sharp -> ct-smooth"
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(loaded.generator(x), Smoother(layers=2)(x))
    assert not loaded.generator.training


def test_wrong_sha256_is_refused(tmp_path):
    folder = make_model(tmp_path)
    with (folder / WEIGHTS_FILE).open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ModelError, match="does not match model.json"):
        load_model_folder(folder)


def test_missing_folder_and_field_are_named(tmp_path):
    with pytest.raises(ModelError, match="no model.json"):
        read_model_info(tmp_path / "nope")
    folder = make_model(tmp_path)
    meta = json.loads((folder / MODEL_JSON).read_text())
    del meta["normalisation"]
    (folder / MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="missing field 'normalisation'"):
        read_model_info(folder)


def test_bad_normalisation_and_mismatched_generator_fail_before_writing(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        save_model_folder(tmp_path / "m", Smoother(), name="m", version="1",
                          architecture="test-smoother", params={}, source={}, target={},
                          normalisation={"kind": "zscore", "low": 0, "high": 1})
    with pytest.raises(ValueError, match="does not match architecture"):
        save_model_folder(tmp_path / "m", Smoother(layers=2), name="m", version="1",
                          architecture="test-smoother", params={"layers": 1}, source={},
                          target={}, normalisation=CT_NORM)
    assert not (tmp_path / "m" / MODEL_JSON).exists()


def test_list_reports_models_and_broken_folders(tmp_path):
    make_model(tmp_path, "b")
    make_model(tmp_path, "a", modality="MR")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / MODEL_JSON).write_text("{")
    (tmp_path / "not-a-model").mkdir()
    found = list_model_folders(tmp_path)
    assert [getattr(f, "name", None) for f in found] == ["a", "b", None]
    assert isinstance(found[2], ModelError)
    assert list_model_folders(tmp_path / "missing") == []
