"""Series grouping and loading: decoding, sorting, rescale, and every rejection reason."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from pipelines.series import (
    SeriesError,
    find_series,
    load_series,
    lossy_compression,
    not_harmonisable,
    read_headers,
)
from tests.dicom_factory import phantom, raw_data, write_enhanced_ct, write_series


def expected_ct(slices=8, size=64, seed=0):
    return np.clip(np.rint(phantom(slices, size, seed) + 1024), 0, 4095) - 1024


def test_find_series_groups_by_uid_and_skips_other_files(tmp_path):
    a = write_series(tmp_path / "a" / "deep", seed=1)
    b = write_series(tmp_path / "b", modality="MR", slices=3)
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / ".partial.tmp").write_bytes(b"DICM")
    groups = find_series(tmp_path)
    assert sorted(map(sorted, groups.values())) == sorted([sorted(a), sorted(b)])


def test_slices_sorted_along_normal_with_real_values_and_geometry(tmp_path):
    files = write_series(tmp_path, edit=lambda ds, i: setattr(ds, "InstanceNumber", 8 - i))
    volume = load_series(reversed(files))
    np.testing.assert_array_equal(volume.array, expected_ct())
    assert volume.array.dtype == np.float32
    assert volume.spacing == (2.0, 0.8, 0.8)
    np.testing.assert_allclose(volume.origin, [-25.6, -25.6, 0.0])
    np.testing.assert_allclose(volume.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    assert [f.path for f in volume.frames] == files
    assert "PixelData" not in volume.datasets[0] and volume.warnings == ()


def test_oblique_stack_sorts_by_projection_on_normal(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    files = write_series(tmp_path, orientation=(1.0, 0.0, 0.0, 0.0, c, s), slices=4)
    volume = load_series(files[::-1])
    np.testing.assert_allclose(volume.direction[0], [0, -s, c], atol=1e-6)
    assert volume.spacing[0] == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series_decode_to_the_same_values(tmp_path, syntax):
    volume = load_series(write_series(tmp_path, syntax=syntax, slices=3))
    np.testing.assert_array_equal(volume.array, expected_ct(slices=3))


def test_signed_pixels_and_padding_mask(tmp_path):
    def pad(ds, i):
        ds.PixelPaddingValue = -2000
        arr = np.frombuffer(ds.PixelData, np.int16).copy()
        arr[:5] = -2000
        ds.PixelData = arr.tobytes()
    volume = load_series(write_series(tmp_path, signed=True, slices=2, edit=pad))
    assert volume.padding is not None and volume.padding.sum() == 10
    assert volume.padding[0, 0, :5].all()
    assert volume.array[0, 0, 0] == -2000


@pytest.mark.parametrize("photometric,lossy,values,padding", [
    ("MONOCHROME2", "00", [-2040, -2000, -1990, -1900], [True, True, False, False]),
    ("MONOCHROME2", "01", [-2040, -2000, -1990, -1900], [True, True, True, False]),
    ("MONOCHROME1", "01", [2040, 2000, 1990, 1900], [True, True, True, False]),
])
def test_padding_is_at_or_beyond_the_padding_value_with_a_lossy_tolerance(
        tmp_path, photometric, lossy, values, padding):
    """12 bits stored: a lossy source's tolerance is 4096 / 256 = 16 stored units."""
    pad_value = -2000 if photometric == "MONOCHROME2" else 2000
    def pad(ds, i):
        ds.PixelPaddingValue = pad_value
        ds.PhotometricInterpretation, ds.LossyImageCompression = photometric, lossy
        arr = np.frombuffer(ds.PixelData, np.int16).copy()
        arr[:4] = values
        ds.PixelData = arr.tobytes()
    volume = load_series(write_series(tmp_path, signed=True, slices=1, size=16, edit=pad))
    assert volume.padding[0, 0, :4].tolist() == padding


def test_enhanced_multiframe_uses_per_frame_groups(tmp_path):
    volume = load_series([write_enhanced_ct(tmp_path / "e.dcm", slices=6, size=32)])
    assert volume.array.shape == (6, 32, 32)
    assert volume.spacing == (2.5, 0.7, 0.7)
    assert [f.frame for f in volume.frames] == [5, 4, 3, 2, 1, 0]
    np.testing.assert_allclose(volume.array, phantom(6, 32, 0), atol=0.51)


def test_localiser_is_split_off_with_a_warning(tmp_path):
    def localiser(ds, i):
        if i == 0:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    volume = load_series(write_series(tmp_path, edit=localiser))
    assert volume.array.shape[0] == 7
    assert volume.warnings == ("split off 1 localiser image(s)",)


def test_objects_other_than_grayscale_images_are_set_aside(tmp_path):
    """Philips MR scanners put Raw Data objects in the image series (same series UID); a
    colour screen may share one too. The images are loaded, the rest named in a warning."""
    files = write_series(tmp_path, modality="MR", slices=4)
    raw = Dataset()
    raw.file_meta = FileMetaDataset()
    raw.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "FrameOfReferenceUID"):
        setattr(raw, keyword, getattr(load_series(files[:1]).datasets[0], keyword))
    raw.SOPClassUID, raw.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.66", "1.2.3.4"
    raw.save_as(tmp_path / "raw.dcm", enforce_file_format=True)
    colour = load_series(files[:1]).datasets[0]
    colour.PhotometricInterpretation, colour.SOPInstanceUID = "RGB", "1.2.3.5"
    colour.save_as(tmp_path / "colour.dcm")
    volume = load_series([tmp_path / "raw.dcm", *files, tmp_path / "colour.dcm"])
    assert volume.array.shape[0] == 4
    np.testing.assert_array_equal(volume.array, load_series(files).array)
    assert volume.warnings == ("set aside 2 instance(s) that are not grayscale images:"
                               " Raw Data Storage; colour images (RGB)",)
    with pytest.raises(SeriesError, match="^not harmonisable: Raw Data Storage$"):
        load_series([tmp_path / "raw.dcm"])


def test_a_large_set_aside_object_is_never_read(tmp_path):
    """A scanner's raw data object can hold hundreds of MB in private tags: routing and
    loading the series must not read it (they read it whole, twice, before)."""
    files = write_series(tmp_path, slices=4)
    raw = raw_data(dcmread(files[0]))
    payload = 64 * 2**20
    raw.private_block(0x2005, "Philips MR Imaging DD 001").add_new(0x11, "OB", bytes(payload))
    raw.save_as(tmp_path / "raw.dcm", enforce_file_format=True)
    tracemalloc.start()
    try:
        read_headers([*files, tmp_path / "raw.dcm"])
        volume = load_series([*files, tmp_path / "raw.dcm"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert volume.array.shape[0] == 4
    assert peak < payload / 8


def _phase_copies(files, folder, mark) -> list:
    """Each MR image again at its position as another image (``mark`` makes it a phase,
    real or imaginary one), with other pixels: what a magnitude + phase series holds."""
    folder.mkdir()
    out = []
    for i, f in enumerate(files):
        ds = dcmread(f)
        ds.SOPInstanceUID = f"1.2.3.{i}"
        ds.PixelData = bytes(len(ds.PixelData))
        mark(ds)
        ds.save_as(folder / f.name)
        out.append(folder / f.name)
    return out


def _siemens_phase(ds):
    ds.ImageType = ["ORIGINAL", "PRIMARY", "P", "ND"]


def _ge_imaginary(ds):
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x2F, "SS", 3)


def test_phase_and_imaginary_images_beside_magnitude_ones_are_set_aside(tmp_path):
    files = write_series(tmp_path / "m", modality="MR", slices=4)
    magnitude = load_series(files)
    for mark, kind in ((_siemens_phase, "phase"), (_ge_imaginary, "imaginary")):
        others = _phase_copies(files, tmp_path / kind, mark)
        volume = load_series([*others, *files])
        np.testing.assert_array_equal(volume.array, magnitude.array)
        assert volume.warnings == (f"set aside 4 {kind} image(s): only magnitude images are"
                                   " harmonised",)
        with pytest.raises(SeriesError, match=f"^only {kind} images in series, no magn"):
            load_series(others)
        headers = read_headers(others)
        assert not_harmonisable(headers) == f"not harmonisable: {kind} images only"
        assert not_harmonisable(read_headers([*others, *files])) is None


def test_ct_image_type_values_are_not_read_as_complex_parts(tmp_path):
    def ct_p(ds, i):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "P"]
    assert load_series(write_series(tmp_path, slices=3, edit=ct_p)).warnings == ()


def test_gap_is_a_warning(tmp_path):
    def gap(ds, i):
        if i >= 4:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 4]
    volume = load_series(write_series(tmp_path, edit=gap))
    assert volume.array.shape[0] == 8
    assert "uneven slice spacing: 6.000 mm between slices 3 and 4" in volume.warnings[0]


def _rgb(ds, i):
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "RGB", 3


def _no_photometric(ds, i):
    del ds.PhotometricInterpretation


def _oblique_slice(ds, i):
    if i == 2:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]


def _small_slice(ds, i):
    if i == 1:
        ds.Rows = ds.Columns = 32
        ds.PixelData = ds.PixelData[: 32 * 32 * 2]


def _duplicate(ds, i):
    if i == 3:
        ds.ImagePositionPatient = [-25.6, -25.6, 4.0]


def _spacing(ds, i):
    if i == 0:
        ds.PixelSpacing = [0.5, 0.5]


def _no_position(ds, i):
    del ds.ImagePositionPatient


@pytest.mark.parametrize("edit, reason", [
    (_rgb, "not harmonisable: colour images (RGB)"),
    (_no_photometric, "PhotometricInterpretation <absent> is not monochrome"),
    (_oblique_slice, "mixed orientations: 1\\0\\0\\0\\1\\0 (7 images), 1\\0\\0\\0\\0.8\\0.6"
                     " (1 image)"),
    (_small_slice, "mixed image sizes: 64x64 (7 images), 32x32 (1 image)"),
    (_duplicate, "duplicate slice positions: 2 images at 4.000 mm"),
    (_spacing, "mixed pixel spacings"),
    (_no_position, "no ImagePositionPatient/ImageOrientationPatient"),
])
def test_rejections_say_why(tmp_path, edit, reason):
    with pytest.raises(SeriesError) as info:
        load_series(write_series(tmp_path, edit=edit))
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_and_empty_series_are_rejected(tmp_path):
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"nonsense")
    with pytest.raises(SeriesError, match="not readable as DICOM"):
        load_series([bad])
    with pytest.raises(SeriesError, match="no images"):
        load_series([])


@pytest.mark.parametrize("syntax,flag,expected", [
    (JPEG2000, "01", (True, "ISO_15444_1")),   # lossy and said so, method not named
    (JPEG2000, None, (True, "ISO_15444_1")),   # may be lossy: assume it was
    (JPEG2000, "00", (False, None)),           # the header says reversible
    (JPEGBaseline8Bit, None, (True, "ISO_10918_1")),
    (ExplicitVRLittleEndian, "01", (True, None)),  # lossy once, uncompressed now
    (RLELossless, None, (False, None)),
])
def test_lossy_compression_from_syntax_and_flag(syntax, flag, expected):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    if flag:
        ds.LossyImageCompression = flag
    assert lossy_compression(ds) == expected


def test_not_harmonisable_names_the_other_sop_classes():
    def of(*uids: str) -> list[Dataset]:
        datasets = [Dataset() for _ in uids]
        for ds, uid in zip(datasets, uids, strict=True):
            ds.SOPClassUID = uid
        return datasets
    ct, mr_enh = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4.1"
    kos, rdsr = "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.5.1.4.1.1.88.67"
    assert not_harmonisable(of(ct, ct)) is None and not_harmonisable(of(mr_enh)) is None
    assert not_harmonisable(of(kos)) == "not harmonisable: Key Object Selection Document Storage"
    assert not_harmonisable(of(rdsr, "")) == (
        "not harmonisable: X-Ray Radiation Dose SR Storage, no SOP Class UID")
    assert not_harmonisable(of(ct, rdsr, "")) is None  # the CT images are harmonised
    assert not_harmonisable(of("1.3.12.2.1107.5.9.1")) == (
        "not harmonisable: Siemens CSA Non-Image Storage")


def test_not_harmonisable_colour_and_scout_series():
    """Valid images the node has no model for: colour (a dose screen, a photo) and
    localisers (scouts, topograms) only; beside axial images they are split off later."""
    def image(photometric: str | None = "MONOCHROME2",
              image_type: str | list[str] = "ORIGINAL\\PRIMARY\\AXIAL") -> Dataset:
        ds = Dataset()
        ds.SOPClassUID, ds.ImageType = "1.2.840.10008.5.1.4.1.1.2", image_type
        if photometric:
            ds.PhotometricInterpretation = photometric
        return ds
    scout = "ORIGINAL\\PRIMARY\\LOCALIZER"
    assert not_harmonisable([image(), image("MONOCHROME1"), image(None)]) is None
    assert not_harmonisable([image("RGB"), image("YBR_FULL_422")]) == (
        "not harmonisable: colour images (RGB, YBR_FULL_422)")
    assert not_harmonisable([image(), image("RGB")]) is None  # the colour one is set aside
    assert not_harmonisable([image("RGB"), image(image_type=scout)]) == (
        "not harmonisable: localiser images only")
    assert not_harmonisable([image(image_type=scout)] * 2) == (
        "not harmonisable: localiser images only")
    assert not_harmonisable([image(image_type=scout), image()]) is None
    assert not_harmonisable([image(image_type="LOCALIZER")]) is not None  # single value
