"""Small, standard-conformant CT and MR series for tests and the benchmark (pydicom only).

The images are an ellipse phantom with a brighter insert and seeded noise, so a smoothing
generator visibly changes them. ``edit(ds, index)`` lets a test break one thing on purpose.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def phantom(slices: int, size: int, seed: int = 0, low: float = -1000.0,
            soft: float = 40.0, insert: float = 700.0, noise: float = 20.0) -> np.ndarray:
    """Real values (slices, size, size): air, a soft-tissue ellipse and a bright insert."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.linspace(-1, 1, slices), np.linspace(-1, 1, size),
                          np.linspace(-1, 1, size), indexing="ij")
    vol = np.full((slices, size, size), low, dtype=np.float32)
    vol[(x / 0.8) ** 2 + (y / 0.6) ** 2 <= 1] = soft
    vol[((x - 0.3) / 0.2) ** 2 + (y / 0.2) ** 2 + (z / 1.5) ** 2 <= 1] = insert
    return vol + rng.normal(0, noise, vol.shape).astype(np.float32)


def _base(modality: str, study_uid: str, series_uid: str, frame_uid: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "PHANTOM01"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = "20240102", "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC1"
    ds.StudyDescription = "Phantom study"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    ds.SeriesDate, ds.SeriesTime = "20240102", "101600"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.InstitutionName = "Test Hospital"
    ds.StationName = "SCANNER1"
    ds.DeviceSerialNumber = "SN123"
    ds.BodyPartExamined = "CHEST" if modality == "CT" else "HEAD"
    return ds


def write_series(out_dir: Path, *, modality: str = "CT", slices: int = 8, size: int = 64,
                 manufacturer: str = "SIEMENS", model: str = "SOMATOM", kernel: str = "B70f",
                 description: str | None = None, seed: int = 0, spacing: float = 2.0,
                 pixel_spacing: float = 0.8, orientation: tuple[float, ...] = AXIAL,
                 signed: bool = False, field_strength: float = 3.0,
                 syntax: str = ExplicitVRLittleEndian, series_uid: str | None = None,
                 edit: Callable[[Dataset, int], None] | None = None) -> list[Path]:
    """Write one single-frame series as ``out_dir/IMG0001.dcm``...; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid(entropy_srcs=["study", str(seed)])
    series_uid = series_uid or generate_uid(entropy_srcs=["series", modality, kernel, str(seed),
                                                          str(out_dir)])
    frame_uid = generate_uid(entropy_srcs=["frame", str(seed)])
    if modality == "CT":
        real = phantom(slices, size, seed)
        intercept = -1024.0 if not signed else 0.0
    else:
        real = phantom(slices, size, seed, low=0.0, soft=400.0, insert=900.0, noise=15.0)
        real = np.clip(real, 0, None)
        intercept = 0.0
    stored = np.clip(np.rint(real - intercept), -2048 if signed else 0, 4095)
    stored = stored.astype(np.int16 if signed else np.uint16)
    o = np.asarray(orientation)
    normal = np.cross(o[:3], o[3:])
    paths = []
    for i in range(slices):
        ds = _base(modality, study_uid, series_uid, frame_uid)
        ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(i)])
        ds.Manufacturer = manufacturer
        ds.ManufacturerModelName = model
        ds.SoftwareVersions = "VB10"
        ds.SeriesDescription = description or (f"Thorax {kernel}" if modality == "CT"
                                               else "t1_mprage_sag")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.InstanceNumber = i + 1
        ds.ContentDate, ds.ContentTime = "20240102", f"1016{i % 60:02d}"
        ds.AcquisitionNumber = 1
        corner = np.array([-size * pixel_spacing / 2, -size * pixel_spacing / 2, 0.0])
        position = corner + normal * i * spacing
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.SliceThickness = spacing
        ds.SliceLocation = round(float(np.dot(position, normal)), 4)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = int(signed)
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1, "HU"
            ds.KVP = 120
            ds.ConvolutionKernel = kernel
        else:
            ds.ScanningSequence, ds.SequenceVariant = "GR", ["SP", "MP"]
            ds.ScanOptions, ds.MRAcquisitionType = "", "3D"
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 2300, 2.98, 1
            ds.MagneticFieldStrength = field_strength
        ds.WindowCenter, ds.WindowWidth = (40, 400) if modality == "CT" else (500, 1000)
        ds.LossyImageCompression = "00"
        ds.BurnedInAnnotation = "NO"
        ds.PixelData = stored[i].tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if edit:
            edit(ds, i)
        if syntax == JPEG2000:  # lossy: record it as a scanner would
            ds.compress(syntax, j2k_cr=[10])
            ds.LossyImageCompression, ds.LossyImageCompressionRatio = "01", 10
            ds.LossyImageCompressionMethod = "ISO_15444_1"
        elif syntax != ExplicitVRLittleEndian:
            ds.compress(syntax)
        path = out_dir / f"IMG{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced_ct(path: Path, *, slices: int = 6, size: int = 32, spacing: float = 2.5,
                      seed: int = 0) -> Path:
    """One Enhanced CT instance, frames in reverse slice order, rescale per frame."""
    real = phantom(slices, size, seed)
    uid = generate_uid(entropy_srcs=["enhanced", str(seed)])
    ds = _base("CT", generate_uid(), uid, generate_uid())
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Manufacturer = "SIEMENS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = slices
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.7, 0.7], spacing
    orient = Dataset()
    orient.ImageOrientationPatient = list(AXIAL)
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orient])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame, frames = [], []
    for k in reversed(range(slices)):
        item, pos, trans = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, k * spacing]
        slope, intercept = (0.5, -1000.0) if k % 2 else (1.0, -1024.0)
        trans.RescaleSlope, trans.RescaleIntercept, trans.RescaleType = slope, intercept, "HU"
        item.PlanePositionSequence = DicomSequence([pos])
        item.PixelValueTransformationSequence = DicomSequence([trans])
        per_frame.append(item)
        frames.append(np.rint((real[k] - intercept) / slope).astype(np.int16))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_companions(images: list[Path], folder: Path) -> list[Path]:
    """What travels with a CT or MR series in its study, written to ``folder``: a
    segmentation and a key object selection of ``images`` (highdicom), contours and a text
    report (pydicom's test files, moved into the study)."""
    source = [dcmread(p) for p in images]
    folder.mkdir(parents=True, exist_ok=True)
    common = {"manufacturer": "test", "series_instance_uid": hd.UID(), "sop_instance_uid":
              hd.UID(), "instance_number": 1}
    seg = hd.seg.Segmentation(
        source_images=source, pixel_array=np.stack([d.pixel_array > 1000 for d in source]),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="body", segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_number=50, manufacturer_model_name="test", software_versions="1",
        device_serial_number="1", **common)
    common.update(series_instance_uid=hd.UID(), sop_instance_uid=hd.UID())
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=source, content=hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest, referenced_objects=source[:1]),
        series_number=51, **common)
    written = [folder / "seg.dcm", folder / "kos.dcm"]
    seg.save_as(written[0])
    kos.save_as(written[1])
    for name in ("rtstruct.dcm", "reportsi.dcm", "rtdose.dcm"):
        # all ship inside pydicom (never downloaded); rtstruct.dcm has no file meta
        ds = dcmread(get_testdata_file(name, download=False), force=True)
        ds.PatientID, ds.StudyInstanceUID = source[0].PatientID, source[0].StudyInstanceUID
        ds.save_as(folder / name, implicit_vr=ds.original_encoding[0], little_endian=True,
                   enforce_file_format=True)
        written.append(folder / name)
    return written


SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"
RAW_DATA_STORAGE = "1.2.840.10008.5.1.4.1.1.66"


def _non_image(image: Dataset, sop_class: str, series_uid: str) -> Dataset:
    """An object of ``sop_class`` without pixels, in ``image``'s study and ``series_uid``."""
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "StudyInstanceUID", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName", "Modality"):
        setattr(ds, keyword, image.get(keyword, ""))
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def siemens_non_image(image: Dataset) -> Dataset:
    """A Siemens CSA Non-Image object (private SOP class; a scan protocol or spectrum in
    private tags) in the study of ``image``, as Siemens scanners send them with studies."""
    ds = _non_image(image, SIEMENS_CSA_NON_IMAGE, generate_uid())
    ds.Manufacturer = "SIEMENS"
    ds.SeriesNumber, ds.InstanceNumber = 99, 1
    ds.SeriesDescription = "PhoenixZIPReport"
    block = ds.private_block(0x0029, "SIEMENS CSA NON-IMAGE", create=True)
    block.add_new(0x08, "CS", "PHOENIX_PROTOCOL")
    block.add_new(0x10, "OB", bytes(range(256)) * 4)  # the CSA payload, opaque to DICOM
    return ds


def raw_data(image: Dataset) -> Dataset:
    """A Raw Data Storage object *in* ``image``'s series, as Philips MR scanners put them
    beside the images (scanner data in private tags; none of the images' acquisition tags)."""
    ds = _non_image(image, RAW_DATA_STORAGE, str(image.SeriesInstanceUID))
    ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "Philips", image.SeriesNumber, 999
    ds.ContentDate, ds.ContentTime = image.get("StudyDate", ""), image.get("StudyTime", "")
    block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    block.add_new(0x10, "OB", bytes(range(256)) * 2)
    return ds
