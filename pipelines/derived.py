"""The derived series (docs/interface.md, "Derived series"): harmonised pixels in a new
series that a PACS accepts as is and an auditor can trace to its source instances and model.

Each derived instance is a copy of its source instance's header (patient, study, frame of
reference, geometry, acquisition) with: new deterministic UIDs, DERIVED/SECONDARY image
type, derivation description, source image and series references, contributing equipment
(acquiring scanner DCM 109101 and this software DCM 109102), the source's stored pixel
representation, and a documented private block. Source private elements are dropped: they
describe the source pixels, not these. Files are Explicit VR Little Endian, written atomically.
Enhanced (multi-frame) sources give multi-frame instances of the same SOP Class with the
source's functional groups, each frame referencing its source frame.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from pipelines import IMPLEMENTATION_CLASS_UID, implementation_version_name
from pipelines.errors import PipelineError
from pipelines.files import atomic_write, fsync_dir
from pipelines.series import Volume, lossy_compression

MANUFACTURER = "dicomnode"
UNKNOWN_MANUFACTURER = "UNKNOWN"  # the acquiring scanner's, when the source leaves it empty
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "DICOMNODE HARMONISATION 1"
# element offset -> (VR, keyword, description); the block's own documentation, written into
# every instance's Private Data Element Characteristics Sequence.
PRIVATE_ELEMENTS: dict[int, tuple[str, str, str]] = {
    0x10: ("LO", "ModelName", "Name of the harmonisation model (model.json name)"),
    0x11: ("LO", "ModelVersion", "Version of the harmonisation model"),
    0x12: ("LO", "ModelWeightsSHA256", "sha256 of the model's weights file, hex"),
    0x13: ("LO", "RouteName", "Routing rule that selected the model (empty when chosen by hand)"),
    0x14: ("UT", "HarmonisationParameters",
           "JSON: architecture, intensity normalisation and its anchors for this series,"
           " inference device and precision; a multi-domain model's target domain and"
           " style"),
}
# Derivation Code Sequence (CID 7203 is extensible and has no harmonisation concept).
HARMONISATION_CODE = ("HARMONISATION", "Scanner harmonisation by an image-to-image generator",
                      "99DICOMNODE")
# MR Pulse Sequence module (PS3.3 C.8.13.4): describes an ORIGINAL image's acquisition and
# is not allowed on a DERIVED one; the frames' MR functional groups keep those details.
_MR_PULSE_SEQUENCE = (
    "PulseSequenceName", "MRAcquisitionType", "EchoPulseSequence", "MultipleSpinEcho",
    "MultiPlanarExcitation", "PhaseContrast", "VelocityEncodingAcquisitionSequence",
    "TimeOfFlightContrast", "ArterialSpinLabelingContrast", "SteadyStatePulseSequence",
    "EchoPlanarPulseSequence", "SaturationRecovery", "SpectrallySelectedSuppression",
    "OversamplingPhase", "GeometryOfKSpaceTraversal", "RectilinearPhaseEncodeReordering",
    "SegmentedKSpaceTraversal", "CoverageOfKSpace", "NumberOfKSpaceTrajectories")
# Functional groups whose items carry FrameType (Enhanced and Legacy Converted CT/MR).
_FRAME_TYPE_GROUPS = ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence")
# Elements that describe the source's encoding or integrity and would be wrong on a copy.
_DROP = ("SmallestImagePixelValue", "LargestImagePixelValue", "IconImageSequence",
         "DigitalSignaturesSequence", "MACParametersSequence", "EncryptedAttributesSequence",
         "OriginalAttributesSequence", "StorageMediaFileSetUID", "DataSetTrailingPadding",
         "PixelDataProviderURL", "DeviceUID",
         "DerivationCodeSequence", "PrivateDataElementCharacteristicsSequence",
         "SmallestPixelValueInSeries", "LargestPixelValueInSeries")
# Binary VRs whose bytes are words in the data set's byte order: pydicom converts every other
# value when a big-endian header is written little endian, but not these (dcmwrite's warning).
_WORD_VRS = {"OW": "u2", "OF": "f4", "OL": "u4", "OD": "f8", "OV": "u8"}


class WriteError(PipelineError):
    """The derived series could not be built or written."""


@dataclass(frozen=True)
class Provenance:
    """Who made the derived series, with what; the same for every instance of it."""

    model_name: str
    model_version: str
    weights_sha256: str
    software_version: str
    route: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    when: datetime = field(default_factory=lambda: datetime.now(UTC))
    target_domain: str | None = None  # the domain a multi-domain model converted to

    @property
    def uid_key(self) -> str:
        """What the derived UIDs are made from besides the source's: the weights' sha256, and
        for a multi-domain model the target domain (one series to two domains: two series)."""
        return f"{self.weights_sha256}/{self.target_domain}" if self.target_domain \
            else self.weights_sha256

    def description(self) -> str:
        via = f" via route {self.route}" if self.route else ""
        to = f" to domain {self.target_domain}" if self.target_domain else ""
        return (f"Harmonised by dicomnode {self.software_version} with model {self.model_name}"
                f" version {self.model_version} (weights sha256 {self.weights_sha256}){to}{via}")


def derived_series_uid(source_series_uid: str, weights_sha256: str) -> str:
    """Same source series and weights, same UID: re-processing replaces, never duplicates.
    (A multi-domain model passes :attr:`Provenance.uid_key`, its weights and target domain.)"""
    return generate_uid(entropy_srcs=["dicomnode-series", source_series_uid, weights_sha256])


def derived_instance_uid(source_sop_uid: str, weights_sha256: str) -> str:
    return generate_uid(entropy_srcs=["dicomnode-instance", source_sop_uid, weights_sha256])


def stored_range(ds: Dataset) -> tuple[int, int]:
    """The values BitsStored and PixelRepresentation can hold."""
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def to_stored(real: np.ndarray, ds: Dataset,
              rescale: tuple[float, float] | None = None) -> np.ndarray:
    """Real values back to ``ds``'s stored pixels: inverse rescale, round, clip to range.

    ``rescale`` is (slope, intercept) where they are per frame (enhanced images), else
    ``ds``'s own are used. (Padding is the source's real value, passed through by
    :func:`pipelines.intensity.keep_source`, so it comes back as the source's stored value.)
    """
    if rescale is None:
        rescale = (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
    slope, intercept = rescale
    lo, hi = stored_range(ds)
    values = np.clip(np.rint((real.astype(np.float64) - intercept) / slope), lo, hi)
    bits = int(ds.BitsAllocated)
    dtype = np.dtype(f"{'i' if int(ds.PixelRepresentation) else 'u'}{bits // 8}")
    return values.astype(dtype)


def _code(value: str, meaning: str, scheme: str = "DCM") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _acquisition_datetime(ds: Dataset) -> str | None:
    if ds.get("AcquisitionDateTime"):
        return str(ds.AcquisitionDateTime)
    for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"), ("SeriesDate", "SeriesTime"),
                             ("StudyDate", "StudyTime")):
        if ds.get(date_kw):
            return f"{ds.get(date_kw)}{ds.get(time_kw) or ''}"
    return None


def _equipment(source: Dataset, provenance: Provenance, stamp: str) -> DicomSequence:
    """Existing contributors, the acquiring scanner (once) and this software."""
    items = [copy.deepcopy(i) for i in source.get("ContributingEquipmentSequence") or []]
    purposes = {str(c.CodeValue) for i in items for c in i.get("PurposeOfReferenceCodeSequence")
                or []}
    if "109101" not in purposes:
        scanner = Dataset()
        scanner.PurposeOfReferenceCodeSequence = DicomSequence(
            [_code("109101", "Acquisition Equipment")])
        # Type 1 here, Type 2 (may be empty) in the source's General Equipment
        scanner.Manufacturer = source.get("Manufacturer") or UNKNOWN_MANUFACTURER
        for kw in ("InstitutionName", "StationName", "ManufacturerModelName",
                   "DeviceSerialNumber", "SoftwareVersions"):
            if source.get(kw):
                setattr(scanner, kw, source.get(kw))
        acquired = _acquisition_datetime(source)
        if acquired:
            scanner.ContributionDateTime = acquired
        scanner.ContributionDescription = "Acquisition of the source images"
        items.append(scanner)
    software = Dataset()
    software.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code("109102", "Processing Equipment")])
    software.Manufacturer = MANUFACTURER
    software.ManufacturerModelName = provenance.model_name[:64]
    software.SoftwareVersions = [f"dicomnode {provenance.software_version}"[:64],
                                 f"{provenance.model_name} {provenance.model_version}"[:64]]
    software.ContributionDateTime = stamp
    software.ContributionDescription = provenance.description()
    items.append(software)
    return DicomSequence(items)


def encoded(element: DataElement) -> RawDataElement:
    """``element`` encoded once as Explicit VR Little Endian, for a value every instance of a
    series shares: ``dcmwrite`` copies a raw element's bytes as they are into a header of
    that encoding (and decodes it again for any other), so its cost is paid once, not per
    instance (the series reference lists every instance: per instance it would cost
    O(instances), per series O(instances^2))."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, element)
    data = fp.getvalue()
    start = 12 if element.VR in EXPLICIT_VR_LENGTH_32 else 8  # tag, VR, (reserved,) length
    return RawDataElement(element.tag, element.VR, len(data) - start, data[start:], 0, False,
                          True)


@functools.cache
def _characteristics() -> RawDataElement:
    """The private block's Private Data Element Characteristics Sequence (the same in every
    instance), encoded."""
    definitions = []
    for offset, (vr, keyword, description) in PRIVATE_ELEMENTS.items():
        item = Dataset()
        item.PrivateDataElement = offset
        item.PrivateDataElementValueMultiplicity = 1
        item.PrivateDataElementValueRepresentation = vr
        item.PrivateDataElementName = description
        item.PrivateDataElementKeyword = keyword
        item.PrivateDataElementDescription = description
        definitions.append(item)
    characteristics = Dataset()
    characteristics.PrivateGroupReference = PRIVATE_GROUP
    characteristics.PrivateCreatorReference = PRIVATE_CREATOR
    characteristics.PrivateDataElementDefinitionSequence = DicomSequence(definitions)
    characteristics.BlockIdentifyingInformationStatus = "SAFE"
    holder = Dataset()
    holder.PrivateDataElementCharacteristicsSequence = DicomSequence([characteristics])
    return encoded(holder["PrivateDataElementCharacteristicsSequence"])


def _private_block(ds: Dataset, provenance: Provenance) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    values = {0x10: provenance.model_name, 0x11: provenance.model_version,
              0x12: provenance.weights_sha256, 0x13: provenance.route or "",
              0x14: json.dumps(provenance.parameters, sort_keys=True)}
    for offset, (vr, _, _) in PRIVATE_ELEMENTS.items():
        block.add_new(offset, vr, values[offset])
    ds[_characteristics().tag] = _characteristics()


def harmonised_by(ds: Dataset) -> str | None:
    """``"<model> <version>"`` when ``ds`` carries dicomnode's own provenance: its private
    block, or (once a PACS has stripped private tags) its Processing Equipment item."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        return f"{block[0x10].value} {block[0x11].value}"
    except KeyError:
        pass
    for item in ds.get("ContributingEquipmentSequence") or []:
        purposes = {str(c.get("CodeValue")) for c in item.get("PurposeOfReferenceCodeSequence")
                    or []}
        if "109102" in purposes and item.get("Manufacturer") == MANUFACTURER:
            versions = item.get("SoftwareVersions")  # ["dicomnode <v>", "<model> <version>"]
            if isinstance(versions, Sequence) and not isinstance(versions, str) and \
                    len(versions) > 1:
                return str(versions[1])
            return str(item.get("ManufacturerModelName", "unknown model"))
    return None


def already_harmonised(datasets: Sequence[Dataset]) -> str | None:
    """Why a series must not be harmonised again (a derived series sent back, or a re-run over
    the output folder), or None. Harmonising twice would drift images and send copies of
    copies; any instance carrying dicomnode's provenance decides."""
    for ds in datasets:
        if by := harmonised_by(ds):
            return f"already harmonised by dicomnode ({by})"
    return None


def _series_description(source: Dataset, model_name: str) -> str:
    suffix = f" [harmonised: {model_name}]"
    base = str(source.get("SeriesDescription") or source.get("Modality") or "").strip()
    return (base[: max(0, 64 - len(suffix))] + suffix)[-64:].strip()


@dataclass(frozen=True)
class SeriesReference:
    """The ReferencedSeriesSequence item listing every instance of the source series once
    (``item``), and the sequence of just that item, encoded once (:func:`encoded`)."""

    item: Dataset
    sequence: RawDataElement


def series_reference(sources: Sequence[Dataset]) -> SeriesReference:
    """The source series' :class:`SeriesReference`, built once per series."""
    ref = Dataset()
    ref.SeriesInstanceUID = sources[0].SeriesInstanceUID
    instances = []
    for s in {str(s.SOPInstanceUID): s for s in sources}.values():
        item = Dataset()
        item.ReferencedSOPClassUID = s.SOPClassUID
        item.ReferencedSOPInstanceUID = s.SOPInstanceUID
        instances.append(item)
    ref.ReferencedInstanceSequence = DicomSequence(instances)
    holder = Dataset()
    holder.ReferencedSeriesSequence = DicomSequence([ref])
    return SeriesReference(ref, encoded(holder["ReferencedSeriesSequence"]))


def _source_image(source: Dataset, frame_number: int | None = None) -> Dataset:
    """A Source Image Sequence item: this source instance (and 1-based frame), DCM 121322."""
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None:
        ref.ReferencedFrameNumber = frame_number
    ref.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code("121322", "Source image for image processing operation")])
    return ref


def _mark_lossy(ds: Dataset, source: Dataset) -> None:
    """A source that was ever lossy compressed keeps saying so (PS3.3 C.7.6.1.1.5), with the
    method of its own lossy transfer syntax when the source did not name one."""
    lossy, method = lossy_compression(source)
    if lossy:
        ds.LossyImageCompression = "01"
        if method and "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = method


def _swap_words(ds: Dataset) -> None:
    """Big-endian word values (e.g. OverlayData) to little endian, in place, nested too."""
    def swap(dataset: Dataset, element: Any) -> None:
        word = _WORD_VRS.get(element.VR)
        if word and element.tag != 0x7FE00010 and isinstance(element.value, bytes):
            element.value = np.frombuffer(element.value, f">{word}").astype(f"<{word}").tobytes()
    ds.walk(swap)


def _frame_of_reference(ds: Dataset, source_series_uid: str) -> None:
    """Give a source that lost its Frame of Reference (de-identification tools strip it)
    one that every instance of its series shares, so the derived images' position and
    orientation mean something to a viewer (the CT and MR IODs require it)."""
    ds.FrameOfReferenceUID = generate_uid(
        entropy_srcs=["dicomnode-frame-of-reference", source_series_uid])
    if "PositionReferenceIndicator" not in ds:
        ds.PositionReferenceIndicator = ""


def _drop_private(ds: Dataset) -> None:
    """Remove private elements from ``ds`` and, at every depth, from its sequences' items,
    decoding nothing else (:meth:`Dataset.remove_private_tags` decodes every element)."""
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]
            continue
        element = ds.get_item(tag)
        if element.VR in (None, "SQ", "UN"):  # implicit VR: decode to learn the VR
            element = ds[tag]
        if element.VR == "SQ":
            for item in element.value:
                _drop_private(item)


def _public_copy(source: Dataset) -> Dataset:
    """``source``'s public elements for a derived header, in ``source``'s encoding: elements
    never decoded are immutable and shared (and ``dcmwrite`` copies their bytes), decoded
    ones are copied, sequences deep-copied without their private elements."""
    ds = Dataset()
    for tag in source.keys():
        if tag.is_private:
            continue
        element = source.get_item(tag)
        if isinstance(element, RawDataElement) and element.VR not in (None, "SQ", "UN"):
            ds[tag] = element
            continue
        element = source[tag]
        ds[tag] = copy.deepcopy(element) if element.VR == "SQ" else copy.copy(element)
        if element.VR == "SQ":
            for item in ds[tag].value:
                _drop_private(item)
    ds.set_original_encoding(*source.original_encoding, source.original_character_set)
    return ds


def _derived_header(source: Dataset, *, series_uid: str, series_ref: SeriesReference,
                    provenance: Provenance) -> Dataset:
    """The source header with what every derived instance gets, single- or multi-frame."""
    ds = _public_copy(source)
    if source.original_encoding[1] is False:  # read as Explicit VR Big Endian
        _swap_words(ds)
    for keyword in _DROP:
        if keyword in ds:
            delattr(ds, keyword)
    stamp = provenance.when.strftime("%Y%m%d%H%M%S.%f+0000")
    date, time = provenance.when.strftime("%Y%m%d"), provenance.when.strftime("%H%M%S.%f")
    ds.SOPInstanceUID = derived_instance_uid(str(source.SOPInstanceUID), provenance.uid_key)
    ds.SeriesInstanceUID = series_uid
    if not str(source.get("FrameOfReferenceUID", "")).strip():
        _frame_of_reference(ds, str(source.SeriesInstanceUID))
    ds.SeriesDescription = _series_description(source, provenance.model_name)
    if str(source.get("SeriesNumber", "")).strip():
        ds.SeriesNumber = int(source.SeriesNumber) + 1000
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
    others = [i for i in ds.get("ReferencedSeriesSequence") or []
              if i.get("SeriesInstanceUID") != series_ref.item.SeriesInstanceUID]
    if others:  # e.g. localisers
        ds.ReferencedSeriesSequence = DicomSequence([series_ref.item, *others])
    else:
        ds[series_ref.sequence.tag] = series_ref.sequence
    ds.ContributingEquipmentSequence = _equipment(source, provenance, stamp)
    _mark_lossy(ds, source)
    _private_block(ds, provenance)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    """Stored pixels, (rows, cols) or (frames, rows, cols), as native little-endian data."""
    if pixels.shape[-2:] != (int(ds.Rows), int(ds.Columns)):
        raise WriteError(f"pixels of shape {pixels.shape} for a {ds.Rows}x{ds.Columns} image")
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"


def derive_instance(source: Dataset, pixels: np.ndarray, *, series_uid: str,
                    series_ref: SeriesReference, provenance: Provenance) -> Dataset:
    """One derived single-frame instance from its source header (without pixel data) and
    stored pixels (rows, cols).

    ``series_ref`` comes from :func:`series_reference` (built once per series).
    """
    ds = _derived_header(source, series_uid=series_uid, series_ref=series_ref,
                         provenance=provenance)
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if source.Modality == "CT" else "OTHER"]
    ds.DerivationDescription = provenance.description()
    ds.SourceImageSequence = DicomSequence([_source_image(source)])
    if pixels.ndim != 2:
        raise WriteError(f"pixels of shape {pixels.shape} for a single-frame image")
    _set_pixels(ds, pixels)
    return ds


def encode_instance(ds: Dataset, name: str) -> bytes:
    """``ds`` as the bytes of an Explicit VR Little Endian Part 10 file written by dicomnode
    (our Implementation Class UID and version in its meta); ``name`` is for the error.

    ``dcmwrite`` with an explicit encoding (not ``save_as``) so that a header copied from a
    big-endian source is converted rather than refused.
    """
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = implementation_version_name()
    buffer = DicomBytesIO()
    try:
        dcmwrite(buffer, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    except Exception as exc:  # pydicom raises ValueError, TypeError, struct.error ... per value
        raise WriteError(f"{name}: cannot encode as Explicit VR Little Endian: {exc}"
                         ) from exc
    return buffer.getvalue()


def store(data: bytes, path: Path, sync_folder: bool = True) -> None:
    """Write ``data`` as ``path`` durably; a crash leaves no half file. ``sync_folder=False``
    leaves the folder's fsync (which makes the name durable) to the caller, once for many
    files."""
    atomic_write(path, lambda fh: fh.write(data), sync_folder=sync_folder)


def write_atomic(ds: Dataset, path: Path) -> None:
    """:func:`encode_instance`, then :func:`store`."""
    store(encode_instance(ds, path.name), path)


def derive_multiframe_instance(source: Dataset, pixels: np.ndarray,
                               frame_indices: Sequence[int], *, series_uid: str,
                               series_ref: SeriesReference, provenance: Provenance) -> Dataset:
    """One derived Enhanced / Legacy Converted Enhanced instance mirroring its source's frames.

    ``frame_indices`` are the 0-based source frames kept (localiser frames may be left out),
    in source order; ``pixels`` their stored values (frames, rows, cols). Functional groups
    (geometry, pixel measures, frame content, per-frame rescale) are the source's; each frame
    references its source frame in its Derivation Image Sequence (PS3.3 C.7.6.16.2.6).
    """
    ds = _derived_header(source, series_uid=series_uid, series_ref=series_ref,
                         provenance=provenance)
    if len(frame_indices) != len(pixels):
        raise WriteError(f"{len(pixels)} frames of pixels for {len(frame_indices)} frames")
    if "ImageType" in ds:
        ds.ImageType = _derived_type(ds.ImageType)
    for keyword in _MR_PULSE_SEQUENCE:
        if keyword in ds:
            delattr(ds, keyword)
    ds.SourceImageEvidenceSequence = DicomSequence([_evidence(source)])
    shared = list(ds.get("SharedFunctionalGroupsSequence") or [])
    for item in shared:
        if "DerivationImageSequence" in item:
            del item.DerivationImageSequence  # the source's own derivation, not this one
    per_frame = [ds.PerFrameFunctionalGroupsSequence[k] for k in frame_indices]
    for k, item in zip(frame_indices, per_frame, strict=True):
        derivation = Dataset()
        derivation.DerivationDescription = provenance.description()
        derivation.DerivationCodeSequence = DicomSequence([_code(*HARMONISATION_CODE)])
        derivation.SourceImageSequence = DicomSequence([_source_image(source, k + 1)])
        item.DerivationImageSequence = DicomSequence([derivation])
    for item in [*shared, *per_frame]:
        for keyword in _FRAME_TYPE_GROUPS:
            for inner in item.get(keyword) or []:
                if "FrameType" in inner:
                    inner.FrameType = _derived_type(inner.FrameType)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.NumberOfFrames = len(per_frame)
    _set_pixels(ds, pixels)
    return ds


def _derived_type(value: Sequence[str]) -> list[str]:
    """Value 1 becomes DERIVED; the rest stay (Enhanced images allow only PRIMARY as
    value 2, PS3.3 C.8.16.1.2, so it cannot become SECONDARY as on single-frame images)."""
    return ["DERIVED", *(str(v) for v in list(value)[1:])]


def _evidence(source: Dataset) -> Dataset:
    """Source Image Evidence item: the source instance, study > series > instance."""
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.SOPClassUID
    instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedSOPSequence = DicomSequence([instance])
    study = Dataset()
    study.StudyInstanceUID = source.StudyInstanceUID
    study.ReferencedSeriesSequence = DicomSequence([series])
    return study


def _derived_instances(volume: Volume, harmonised: np.ndarray, *, series_uid: str,
                       provenance: Provenance) -> Iterator[Dataset]:
    """One derived instance per source instance: single-frame per slice, multi-frame with
    the source's frames in the source's frame order."""
    reference = series_reference(volume.datasets)
    slices_of: dict[Path, list[int]] = {}
    for i, f in enumerate(volume.frames):
        slices_of.setdefault(f.path, []).append(i)
    for slices in slices_of.values():
        slices.sort(key=lambda i: volume.frames[i].frame or 0)
        frames = [volume.frames[i] for i in slices]
        stored = np.stack([
            to_stored(harmonised[i], f.dataset, rescale=(f.slope, f.intercept))
            for i, f in zip(slices, frames, strict=True)])
        source = frames[0].dataset
        if frames[0].frame is None:
            yield derive_instance(source, stored[0], series_uid=series_uid,
                                  series_ref=reference, provenance=provenance)
        else:
            yield derive_multiframe_instance(
                source, stored, [f.frame or 0 for f in frames], series_uid=series_uid,
                series_ref=reference, provenance=provenance)


def write_derived_series(volume: Volume, harmonised: np.ndarray, provenance: Provenance,
                         out_dir: Path) -> tuple[str, list[Path]]:
    """Write ``out_dir/<derived series UID>/<SOP instance UID>.dcm`` for every source instance.

    Single-frame sources give one instance per slice; enhanced (multi-frame) sources one
    multi-frame instance per source instance, of the same SOP Class. Re-running replaces the
    same files (same UIDs) and removes instances a previous run wrote that this one did not.
    Returns the derived series UID and the written paths.
    """
    if harmonised.shape != volume.array.shape:
        raise WriteError(f"harmonised shape {harmonised.shape} differs from the source's"
                         f" {volume.array.shape}")
    source_uid = str(volume.frames[0].dataset.SeriesInstanceUID)
    series_uid = derived_series_uid(source_uid, provenance.uid_key)
    folder = Path(out_dir) / series_uid
    created = not folder.exists()
    written: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # one thread writes and fsyncs each file (the GIL is free meanwhile) while this one
        # builds and encodes the next; the folder is fsynced once, after the last
        writes: dict[Path, Future] = {}
        with ThreadPoolExecutor(1, thread_name_prefix="derived-write") as writer:
            try:
                for ds in _derived_instances(volume, harmonised, series_uid=series_uid,
                                             provenance=provenance):
                    path = folder / f"{ds.SOPInstanceUID}.dcm"
                    writes[path] = writer.submit(store, encode_instance(ds, path.name), path,
                                                 False)
            finally:
                wait(writes.values())
                written += [p for p, f in writes.items() if f.exception() is None]
        for future in writes.values():
            future.result()  # the first failed write, if any
        for stale in set(folder.glob("*.dcm")) - set(written):
            stale.unlink()
        fsync_dir(folder)
    except Exception as exc:
        if created:  # no empty or partial new series left behind
            for path in written:
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write derived series to {folder}: {exc}") from exc
        raise
    return series_uid, written
