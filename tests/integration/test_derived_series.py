"""The derived series: validators, geometry, every tag docs/interface.md names, determinism,
pixel fidelity."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filewriter import dcmwrite
from pydicom.pixels import pack_bits
from pydicom.uid import JPEG2000, ExplicitVRBigEndian, ExplicitVRLittleEndian, RLELossless

from dicomnode.cli import main
from pipelines import IMPLEMENTATION_CLASS_UID, derived
from pipelines.derived import (
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    Provenance,
    WriteError,
    stored_range,
    to_stored,
    write_derived_series,
)
from pipelines.harmonise import harmonise_series
from pipelines.inference import InferenceSettings
from pipelines.intensity import EDGE, Normalisation, keep_source
from pipelines.routing import parse_routes
from pipelines.series import load_series
from tests.dicom_factory import write_series
from tests.model_factory import CT_NORM, Smoother, make_model

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
        assert d.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert d.file_meta.ImplementationVersionName.startswith("DICOMNODE_")


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
    expected = np.rint(keep_source(real, (out + 1) / 2 * 4095 - 1024, (-1024, 3071),
                                   Normalisation.from_spec(CT_NORM))) + 1024
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


PROVENANCE = Provenance(model_name="m", model_version="1", weights_sha256="ab" * 32,
                        software_version="0")


def big_endian_with_overlay(folder):
    """pydicom's big-endian MR with a 1-bit overlay added (OW words in big-endian order)."""
    ds = dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    overlay = np.zeros((ds.Rows, ds.Columns), np.uint8)
    overlay[5:20, 3:40] = 1
    ds.add_new(0x60000010, "US", ds.Rows)
    ds.add_new(0x60000011, "US", ds.Columns)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    words = np.frombuffer(pack_bits(overlay.ravel()), "<u2").astype(">u2")
    ds.add_new(0x60003000, "OW", words.tobytes())
    folder.mkdir(parents=True)
    path = folder / "be.dcm"
    dcmwrite(path, ds, enforce_file_format=True, little_endian=False, implicit_vr=False)
    return path, ds.pixel_array, overlay


def test_big_endian_source_is_written_little_endian_with_pixels_and_words_intact(tmp_path):
    path, pixels, overlay = big_endian_with_overlay(tmp_path / "in")
    volume = load_series([path])
    _, (out,) = write_derived_series(volume, volume.array, PROVENANCE, tmp_path / "out")
    source, derived = dcmread(path), dcmread(out)
    assert source.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    assert derived.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(derived.pixel_array, pixels)  # identity in, source out
    np.testing.assert_array_equal(derived.overlay_array(0x6000), overlay)
    for keyword in ("PixelSpacing", "ImagePositionPatient", "EchoTime", "BitsStored"):
        assert derived.get(keyword) == source.get(keyword), keyword


def test_big_endian_source_through_the_harmonise_command(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    shutil.copy(get_testdata_file("MR_small_bigendian.dcm"), tmp_path / "in")
    make_model(tmp_path / "models", "mr-smooth", modality="MR")
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nmodels_dir = "{tmp_path / "models"}"\n')
    assert main(["harmonise", str(tmp_path / "in"), str(tmp_path / "out"), "--config",
                 str(config), "--model", "mr-smooth"]) == 0
    (out,) = (tmp_path / "out").rglob("*.dcm")
    assert dcmread(out).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_failed_write_leaves_no_derived_folder(tmp_path, monkeypatch):
    volume = load_series(write_series(tmp_path / "in", slices=2, size=16))
    def refuse(ds, name):
        raise WriteError(f"{name}: cannot encode")
    monkeypatch.setattr(derived, "encode_instance", refuse)
    with pytest.raises(WriteError, match="cannot encode"):
        write_derived_series(volume, volume.array, PROVENANCE, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def harmonise_real(tmp_path, name):
    """One of pydicom's real CT files through a CT smoother: (source, derived) datasets."""
    (tmp_path / "in").mkdir()
    shutil.copy(get_testdata_file(name), tmp_path / "in")
    make_model(tmp_path / "models", "ct-smooth", layers=2)
    outcome = harmonise_series([tmp_path / "in" / name], routes=ROUTES,
                               models_dir=tmp_path / "models", out_dir=tmp_path / "out",
                               options=FP32, model_name="ct-smooth")
    (path,) = outcome.outputs
    return dcmread(tmp_path / "in" / name), dcmread(path)


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_real_ct_values_beyond_the_model_window_keep_their_values(tmp_path, name):
    """693_J2KI: lossy, padding -2000 (-3024 HU) with ringing down to -3995 HU; the other has
    no padding attribute and a -2000 HU background. Neither may be pulled to -1024 HU."""
    source, derived = harmonise_real(tmp_path, name)
    stored = source.pixel_array.astype(np.int32)
    hu = stored * float(source.RescaleSlope) + float(source.RescaleIntercept)
    margin = EDGE * (3071 + 1024)   # where model output and source blend, beyond the window
    outside = (hu < -1024 - margin) | (hu > 3071 + margin)
    assert outside.mean() > 0.2  # the case the test is about
    np.testing.assert_array_equal(derived.pixel_array[outside], stored[outside])
    inside = (hu > -1000) & (hu < 3000)
    assert np.abs(derived.pixel_array[inside] - stored[inside]).mean() > 2  # harmonised


@pytest.mark.parametrize("name,manufacturer", [("J2K_pixelrep_mismatch.dcm", "UNKNOWN"),
                                               ("CT_small.dcm", "GE MEDICAL SYSTEMS")])
def test_real_ct_sources_give_valid_derived_images(tmp_path, name, manufacturer):
    """J2K_pixelrep_mismatch leaves Manufacturer empty (Type 2): the acquiring scanner's
    Contributing Equipment item needs one (Type 1)."""
    _, derived = harmonise_real(tmp_path, name)
    scanner = derived.ContributingEquipmentSequence[0]
    assert scanner.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
    assert scanner.Manufacturer == manufacturer
    if not shutil.which("dciodvfy"):
        pytest.skip("dicom3tools not installed")
    result = subprocess.run(["dciodvfy", derived.filename], capture_output=True, text=True)
    errors = [line for line in (result.stdout + result.stderr).splitlines()
              if line.startswith("Error")]
    assert errors == []


def test_lossy_jpeg2000_source_already_flagged_gets_its_method(tmp_path):
    """693_J2KI: JPEG 2000 (.91), LossyImageCompression 01, no method named."""
    source, derived = harmonise_real(tmp_path, "693_J2KI.dcm")
    assert "LossyImageCompressionMethod" not in source
    assert derived.LossyImageCompression == "01"
    assert derived.LossyImageCompressionMethod == "ISO_15444_1"


def test_source_without_frame_of_reference_gets_one_shared_by_its_series(tmp_path):
    """De-identification tools may strip FrameOfReferenceUID (Type 1 in the CT and MR
    IODs); the derived series gets one, the same for every instance and every re-run."""
    files = write_series(tmp_path / "in", slices=3)
    for path in files:
        ds = dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    make_model(tmp_path / "models", "ct-smooth", layers=2)
    frames = set()
    for run_dir in ("a", "b"):
        outcome = harmonise_series(files, routes=ROUTES, models_dir=tmp_path / "models",
                                   out_dir=tmp_path / run_dir, options=FP32)
        frames |= {str(dcmread(p).FrameOfReferenceUID) for p in outcome.outputs}
    assert len(frames) == 1 and frames.pop().startswith("1.2.")
    if not shutil.which("dciodvfy"):
        pytest.skip("dicom3tools not installed")
    result = subprocess.run(["dciodvfy", str(outcome.outputs[0])], capture_output=True,
                            text=True)
    assert [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")] == []
