"""The derived series: validators, geometry, every CONTRACT tag, determinism, pixel fidelity."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, RLELossless

from pipelines.derived import PRIVATE_CREATOR, PRIVATE_GROUP, stored_range, to_stored
from pipelines.harmonise import harmonise_series
from pipelines.inference import InferenceSettings
from pipelines.routing import parse_routes
from tests.dicom_factory import write_series
from tests.model_factory import Smoother, make_model

ROUTES = parse_routes([{"name": "ct", "model": "ct-smooth", "match": {"Modality": "CT"}},
                       {"name": "mr", "model": "mr-smooth", "match": {"Modality": "MR"}}])
FP32 = InferenceSettings(device="cpu", bf16=False)  # exact reference values
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
            "Rows", "Columns", "FrameOfReferenceUID", "StudyInstanceUID", "PatientID",
            "PatientName", "StudyDate", "AccessionNumber", "BitsAllocated", "BitsStored",
            "HighBit", "PixelRepresentation", "RescaleSlope", "RescaleIntercept",
            "PhotometricInterpretation", "SOPClassUID", "BurnedInAnnotation", "InstanceNumber",
            "WindowCenter", "WindowWidth")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Harmonise one series of each kind once; tests read the results."""
    root = tmp_path_factory.mktemp("derived")
    models = root / "models"
    make_model(models, "ct-smooth", modality="CT", layers=2)
    make_model(models, "mr-smooth", modality="MR")
    cases = {
        "ct": write_series(root / "in" / "ct"),
        "mr": write_series(root / "in" / "mr", modality="MR", seed=4),
        "lossy": write_series(root / "in" / "lossy", syntax=JPEG2000, signed=True, slices=4),
        "rle": write_series(root / "in" / "rle", syntax=RLELossless, slices=3, seed=5),
    }
    outcomes = {name: harmonise_series(files, routes=ROUTES, models_dir=models,
                                       out_dir=root / "out", options=FP32)
                for name, files in cases.items()}
    return root, cases, outcomes


def read(paths):
    return sorted((dcmread(p) for p in paths), key=lambda d: int(d.InstanceNumber))


@pytest.mark.parametrize("case", ["ct", "mr", "lossy", "rle"])
def test_dciodvfy_and_dcentvfy_report_no_errors(run, case):
    if not (shutil.which("dciodvfy") and shutil.which("dcentvfy")):
        pytest.skip("dicom3tools not installed")
    _, cases, outcomes = run
    outputs = outcomes[case].outputs
    for path in outputs:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"
    # The derived series references its source, so the two are checked as one set.
    result = subprocess.run(["dcentvfy", *map(str, outputs), *map(str, cases[case])],
                            capture_output=True, text=True)
    assert "Error" not in result.stdout + result.stderr


@pytest.mark.parametrize("case", ["ct", "mr", "lossy"])
def test_geometry_patient_study_and_representation_carried_over(run, case):
    _, cases, outcomes = run
    sources, derived = read(cases[case]), read(outcomes[case].outputs)
    assert len(sources) == len(derived)
    for s, d in zip(sources, derived, strict=True):
        for keyword in GEOMETRY:
            assert d.get(keyword) == s.get(keyword), keyword
        assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_every_contract_tag(run):
    _, cases, outcomes = run
    outcome = outcomes["ct"]
    sources, derived = read(cases["ct"]), read(outcome.outputs)
    sha = outcome.model.sha256
    assert outcome.status == "harmonised" and outcome.route == "ct"
    assert {d.SeriesInstanceUID for d in derived} == {outcome.derived_series_uid}
    assert outcome.derived_series_uid != sources[0].SeriesInstanceUID
    assert len({d.SOPInstanceUID for d in derived} | {s.SOPInstanceUID for s in sources}) == 16
    for s, d in zip(sources, derived, strict=True):
        assert list(d.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert "ct-smooth" in d.DerivationDescription and "version 1.0" in d.DerivationDescription
        assert sha in d.DerivationDescription
        (ref,) = d.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == s.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == s.SOPClassUID
        code = ref.PurposeOfReferenceCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == ("121322", "DCM")
        (series_ref,) = d.ReferencedSeriesSequence
        assert series_ref.SeriesInstanceUID == s.SeriesInstanceUID
        assert {i.ReferencedSOPInstanceUID for i in series_ref.ReferencedInstanceSequence} == \
            {x.SOPInstanceUID for x in sources}
        scanner, software = d.ContributingEquipmentSequence
        assert scanner.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
        assert (scanner.Manufacturer, scanner.ManufacturerModelName) == ("SIEMENS", "SOMATOM")
        assert software.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        assert software.Manufacturer == "dicomnode"
        assert software.ManufacturerModelName == "ct-smooth"
        assert software.SoftwareVersions[1] == "ct-smooth 1.0"
        assert software.SoftwareVersions[0].startswith("dicomnode ")
        assert software.ContributionDateTime and "ct-smooth" in software.ContributionDescription
        assert d.SeriesDescription == "Thorax B70f [harmonised: ct-smooth]"
        assert d.LossyImageCompression == "00" and d.BurnedInAnnotation == "NO"
        assert "DeviceUID" not in d and (0x0066, 0x002F) not in d
        block = d.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        assert block[0x12].value == sha and block[0x10].value == "ct-smooth"
        assert d.PrivateDataElementCharacteristicsSequence[0].PrivateGroupReference == \
            PRIVATE_GROUP
    mr = read(outcomes["mr"].outputs)[0]
    assert list(mr.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]


def test_lossy_source_stays_marked_lossy(run):
    _, _, outcomes = run
    for d in read(outcomes["lossy"].outputs):
        assert d.LossyImageCompression == "01"
        assert d.LossyImageCompressionMethod == "ISO_15444_1"


def test_rerun_yields_identical_uids_and_replaces_files(run):
    root, cases, outcomes = run
    folder = root / "out" / outcomes["ct"].derived_series_uid
    before = sorted(folder.iterdir())
    again = harmonise_series(cases["ct"], routes=ROUTES, models_dir=root / "models",
                             out_dir=root / "out", options=FP32)
    assert again.derived_series_uid == outcomes["ct"].derived_series_uid
    assert sorted(again.outputs) == sorted(outcomes["ct"].outputs)
    assert sorted(folder.iterdir()) == before  # no duplicates, no temporary leftovers


def test_pixels_are_the_generator_output_in_stored_units(run):
    _, cases, outcomes = run
    sources, derived = read(cases["ct"]), read(outcomes["ct"].outputs)
    real = np.stack([s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept)
                     for s in sources]).astype(np.float32)
    norm = np.clip((real + 1024) / 4095 * 2 - 1, -1, 1)
    with torch.no_grad():
        out = Smoother(layers=2)(torch.from_numpy(norm)[:, None])[:, 0].numpy()
    expected = np.rint((out + 1) / 2 * 4095 - 1024) + 1024
    got = np.stack([d.pixel_array for d in derived]).astype(np.float64)
    assert np.abs(got - expected).max() <= 1  # float rounding at most one unit
    assert np.abs(got - np.stack([s.pixel_array for s in sources])).max() > 50


def test_to_stored_rounds_and_clips_to_the_representable_range(tmp_path):
    (path,) = write_series(tmp_path, slices=1, size=4)
    ds = dcmread(path)
    assert stored_range(ds) == (0, 4095)
    real = np.array([[-1023.4, -1023.6, -5000, 9000]], np.float32)  # intercept -1024
    assert to_stored(real, ds).tolist() == [[1, 0, 0, 4095]]
    ds.PixelRepresentation, ds.RescaleIntercept = 1, 0
    assert to_stored(np.array([-0.6, 0.6, -3000, 3000]), ds).tolist() == [-1, 1, -2048, 2047]
    assert to_stored(np.array([-0.6]), ds).dtype == np.int16


def test_padding_pixels_keep_the_padding_value(tmp_path):
    def pad(ds, i):
        ds.PixelPaddingValue = 0
        arr = np.frombuffer(ds.PixelData, np.uint16).copy()
        arr[:64] = 0
        ds.PixelData = arr.tobytes()
    files = write_series(tmp_path / "in", slices=2, edit=pad)
    make_model(tmp_path / "models", "ct-smooth", layers=2)
    outcome = harmonise_series(files, routes=ROUTES, models_dir=tmp_path / "models",
                               out_dir=tmp_path / "out")
    for d in read(outcome.outputs):
        assert (d.pixel_array[0] == 0).all() and d.PixelPaddingValue == 0
