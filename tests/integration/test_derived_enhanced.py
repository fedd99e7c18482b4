"""Derived series from enhanced (multi-frame) sources: same SOP Class, frames, functional groups,
per-frame source references, the tags docs/interface.md names, deterministic UIDs, validators."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from pipelines.derived import (
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    derived_instance_uid,
    derived_series_uid,
)
from pipelines.harmonise import harmonise_series
from pipelines.inference import InferenceSettings
from pipelines.intensity import Normalisation, keep_source
from pipelines.routing import parse_routes
from pipelines.series import load_series
from tests.dicom_factory import write_enhanced_ct, write_series
from tests.model_factory import CT_NORM, Smoother, make_model
from trainers.simulation import simulate_series

ROUTES = parse_routes([{"name": "ct", "model": "ct-smooth", "match": {"Modality": "CT"}},
                       {"name": "mr", "model": "mr-smooth", "match": {"Modality": "MR"}}])
FP32 = InferenceSettings(device="cpu", bf16=False)  # exact reference values
# Functional groups a frame's geometry, content and rescale live in.
GROUPS = ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
          "PixelValueTransformationSequence", "FrameContentSequence", "FrameVOILUTSequence",
          "CTPositionSequence", "CTReconstructionSequence", "MRTimingAndRelatedParametersSequence")
CARRIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
           "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "FrameOfReferenceUID",
           "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
           "PhotometricInterpretation", "BurnedInAnnotation", "LossyImageCompression",
           "InstanceNumber", "Manufacturer", "DimensionOrganizationSequence",
           "DimensionIndexSequence")
MR_PULSE_SEQUENCE = ("PulseSequenceName", "MRAcquisitionType", "EchoPulseSequence",
                     "NumberOfKSpaceTrajectories")


def legacy_converted(folder: Path) -> list[Path]:
    """A Legacy Converted Enhanced CT instance (highdicom) from four single-frame images."""
    singles = write_series(folder / "single", slices=4, size=32, seed=7)
    ds = LegacyConvertedEnhancedCTImage(
        [dcmread(p) for p in singles], series_instance_uid=generate_uid(), series_number=5,
        sop_instance_uid=generate_uid(), instance_number=1)
    path = folder / "lce.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Harmonise each kind of enhanced source once; tests read the results."""
    root = tmp_path_factory.mktemp("enhanced")
    models = root / "models"
    make_model(models, "ct-smooth", modality="CT", layers=2)
    make_model(models, "mr-smooth", modality="MR")
    cases = {
        "factory": [write_enhanced_ct(root / "in" / "factory" / "ct.dcm")],
        "sim-ct": simulate_series("CT", "siemens-b70f", root / "in" / "sim-ct", slices=4,
                                  size=32, enhanced=True, progress=False),
        "sim-mr": simulate_series("MR", "siemens-3t-t1w", root / "in" / "sim-mr", slices=4,
                                  size=32, enhanced=True),
        "lce": legacy_converted(root / "in" / "lce"),
    }
    outcomes = {name: harmonise_series(files, routes=ROUTES, models_dir=models,
                                       out_dir=root / "out", options=FP32)
                for name, files in cases.items()}
    return root, cases, outcomes


def only(outcome) -> Dataset:
    assert outcome.status == "harmonised", outcome.reason
    (path,) = outcome.outputs
    return dcmread(path)


def group(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """A frame's functional group item: per-frame if there, else shared."""
    for item in (ds.PerFrameFunctionalGroupsSequence[frame],
                 *(ds.get("SharedFunctionalGroupsSequence") or [])):
        if keyword in item:
            return item[keyword].value[0]
    return None


def errors(*command: str) -> list[str]:
    result = subprocess.run(command, capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


needs_dicom3tools = pytest.mark.skipif(
    not (shutil.which("dciodvfy") and shutil.which("dcentvfy")), reason="no dicom3tools")


@needs_dicom3tools
@pytest.mark.parametrize("case", ["sim-ct", "sim-mr", "lce"])
def test_dciodvfy_and_dcentvfy_report_no_errors(run, case):
    root, cases, outcomes = run
    (path,) = outcomes[case].outputs
    assert errors("dciodvfy", str(path)) == []
    # The derived instance references its source (and a legacy converted source its own
    # single-frame originals), so they are checked as one set.
    related = sorted((root / "in" / "lce" / "single").glob("*.dcm")) if case == "lce" else []
    assert errors("dcentvfy", str(path), *map(str, cases[case]), *map(str, related)) == []


@needs_dicom3tools
def test_derived_adds_no_dciodvfy_errors_to_a_minimal_source(run):
    """The test factory's Enhanced CT lacks many mandatory groups; mirroring it adds none."""
    _, cases, outcomes = run
    (source,) = cases["factory"]
    (derived,) = outcomes["factory"].outputs
    assert set(errors("dciodvfy", str(derived))) <= set(errors("dciodvfy", str(source)))


@pytest.mark.parametrize("case", ["factory", "sim-ct", "sim-mr", "lce"])
def test_same_sop_class_frames_and_functional_groups(run, case):
    _, cases, outcomes = run
    source, derived = dcmread(cases[case][0]), only(outcomes[case])
    assert derived.SOPClassUID == source.SOPClassUID
    assert derived.NumberOfFrames == source.NumberOfFrames
    assert derived.file_meta.MediaStorageSOPClassUID == source.SOPClassUID
    for keyword in CARRIED:
        assert derived.get(keyword) == source.get(keyword), keyword
    for frame in range(int(source.NumberOfFrames)):
        for keyword in GROUPS:
            assert group(derived, frame, keyword) == group(source, frame, keyword), keyword


@pytest.mark.parametrize("case", ["sim-ct", "sim-mr"])
def test_every_contract_tag(run, case):
    _, cases, outcomes = run
    outcome = outcomes[case]
    source, d = dcmread(cases[case][0]), only(outcome)
    model = f"{case[-2:]}-smooth"
    sha = outcome.model.sha256
    assert d.SeriesInstanceUID == outcome.derived_series_uid == \
        derived_series_uid(source.SeriesInstanceUID, sha)
    assert d.SOPInstanceUID == derived_instance_uid(source.SOPInstanceUID, sha)
    assert d.StudyInstanceUID == source.StudyInstanceUID
    assert list(d.ImageType) == ["DERIVED", "PRIMARY", *source.ImageType[2:]]
    frame_type = "CTImageFrameTypeSequence" if case == "sim-ct" else "MRImageFrameTypeSequence"
    assert list(group(d, 0, frame_type).FrameType) == ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    for k, item in enumerate(d.PerFrameFunctionalGroupsSequence):
        (derivation,) = item.DerivationImageSequence
        assert model in derivation.DerivationDescription and sha in \
            derivation.DerivationDescription
        assert derivation.DerivationCodeSequence[0].CodeValue == "HARMONISATION"
        (ref,) = derivation.SourceImageSequence
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == \
            (source.SOPClassUID, source.SOPInstanceUID)
        assert ref.ReferencedFrameNumber == k + 1
        code = ref.PurposeOfReferenceCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == ("121322", "DCM")
    (series_ref,) = d.ReferencedSeriesSequence
    assert series_ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series_ref.ReferencedInstanceSequence] == \
        [source.SOPInstanceUID]
    evidence = d.SourceImageEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    scanner, software = d.ContributingEquipmentSequence
    assert scanner.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
    assert scanner.Manufacturer == source.Manufacturer
    assert software.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert (software.Manufacturer, software.ManufacturerModelName) == ("dicomnode", model)
    assert software.SoftwareVersions[1] == f"{model} 1.0"
    assert d.SeriesDescription == f"{source.SeriesDescription} [harmonised: {model}]"
    assert (d.LossyImageCompression, d.BurnedInAnnotation) == ("00", "NO")
    assert d.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[0x12].value == sha
    if case == "sim-mr":  # MR Pulse Sequence module is for ORIGINAL images only
        assert not any(k in d for k in MR_PULSE_SEQUENCE)
        assert all(k in source for k in MR_PULSE_SEQUENCE)


def test_rerun_yields_identical_uids_and_replaces_the_file(run):
    root, cases, outcomes = run
    first = outcomes["factory"]
    folder = root / "out" / first.derived_series_uid
    before = sorted(folder.iterdir())
    again = harmonise_series(cases["factory"], routes=ROUTES, models_dir=root / "models",
                             out_dir=root / "out", options=FP32)
    assert (again.derived_series_uid, again.outputs) == (first.derived_series_uid, first.outputs)
    assert sorted(folder.iterdir()) == before
    assert only(again).SOPInstanceUID == only(first).SOPInstanceUID


def test_pixels_are_the_generator_output_in_each_frames_rescale(run):
    """Factory frames are in reverse slice order with alternating slope/intercept: the
    derived frames must follow the source's order and rescale, not the volume's."""
    _, cases, outcomes = run
    source, derived = load_series(cases["factory"]), load_series(outcomes["factory"].outputs)
    norm = np.clip((source.array + 1024) / 4095 * 2 - 1, -1, 1)
    with torch.no_grad():
        out = Smoother(layers=2)(torch.from_numpy(norm)[:, None])[:, 0].numpy()
    expected = keep_source(source.array, (out + 1) / 2 * 4095 - 1024, (-1024, 3071),
                           Normalisation.from_spec(CT_NORM))
    assert np.abs(derived.array - expected).max() <= 0.5 + 1e-3  # half the coarsest slope
    assert np.abs(derived.array - source.array).max() > 50
    assert derived.spacing == source.spacing
    assert np.allclose(derived.origin, source.origin)
    assert [f.frame for f in derived.frames] == [f.frame for f in source.frames]
    assert [(f.slope, f.intercept) for f in derived.frames] == \
        [(f.slope, f.intercept) for f in source.frames]
