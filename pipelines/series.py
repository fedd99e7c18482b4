"""Series I/O: group DICOM files by series, and turn one series into a checked volume.

A volume is only built when it is geometrically sound: one orientation, one image size,
one pixel spacing, no two images at the same position, monochrome pixels. Localisers mixed
into a series are split off with a warning; anything else is a :class:`SeriesError` whose
message is one line a PACS admin can act on. Gaps in the slice spacing are warnings.
Enhanced (multi-frame) images are read through their per-frame functional groups.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from pipelines.errors import PipelineError
from pipelines.structure import StructureError, walk_file

log = structlog.get_logger(component="series")

GAP_TOLERANCE = 0.1  # fraction of the median spacing a step may deviate before it is a gap
# Elements larger than this are read from the file only when used: a scanner's raw data object
# in an image series (hundreds of MB in private tags) is set aside without being read.
DEFER_SIZE = "1 MB"
# Transfer syntaxes that compress lossily, with the Lossy Image Compression Method they imply
# (PS3.3 C.7.6.1.1.5.1); the JPEG 2000 ones may also be lossless (LossyImageCompression 00).
LOSSY_METHODS = {JPEGBaseline8Bit: "ISO_10918_1", JPEGExtended12Bit: "ISO_10918_1",
                 JPEGLSNearLossless: "ISO_14495_1", JPEG2000: "ISO_15444_1",
                 HTJ2K: "ISO_15444_15"}
# Padding after lossy compression is no longer exactly PixelPaddingValue: this fraction of the
# stored range beyond it (inwards) still counts as padding.
LOSSY_PADDING_TOLERANCE = 1 / 256


# The images a series may hold to be harmonised: CT and MR, single- and multi-frame (legacy
# converted included), and grayscale secondary capture. Whatever else travels with a study
# (dose reports, key objects, presentation states, segmentations) is never a volume.
IMAGE_SOP_CLASSES = frozenset({
    CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage,
    SecondaryCaptureImageStorage, MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
})


MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Names of private storage classes CT and MR scanners send within studies (for messages)
PRIVATE_CLASS_NAMES = {
    "1.3.12.2.1107.5.9.1": "Siemens CSA Non-Image Storage",  # protocols, spectra, reports
    "1.3.12.2.1107.5.99.3.10": "Siemens CT MR Volume Storage",
}


def _class_name(uid: str) -> str:
    return PRIVATE_CLASS_NAMES.get(uid) or (UID(uid).name if uid else "no SOP Class UID")


def harmonisable(ds: Dataset) -> bool:
    """Whether an instance is an image the node harmonises: one of
    :data:`IMAGE_SOP_CLASSES`, grayscale. Headers suffice."""
    return str(ds.get("SOPClassUID", "")) in IMAGE_SOP_CLASSES and str(
        ds.get("PhotometricInterpretation", "MONOCHROME2")) in MONOCHROME


def harmonisable_images(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The instances of a series that :func:`harmonisable` keeps, in order: a scanner's
    raw data or private objects may share an image series' UID (Philips does this), and
    are set aside like the localisers in an axial series."""
    return [ds for ds in datasets if harmonisable(ds)]


def _others(datasets: Sequence[Dataset]) -> str:
    """What the instances :func:`harmonisable` refuses are, for messages."""
    classes = {str(ds.get("SOPClassUID", "")) for ds in datasets} - IMAGE_SOP_CLASSES
    colour = {str(ds.PhotometricInterpretation) for ds in datasets
              if str(ds.get("SOPClassUID", "")) in IMAGE_SOP_CLASSES and not harmonisable(ds)}
    parts = [", ".join(sorted(map(_class_name, classes)))] if classes else []
    if colour:
        parts.append(f"colour images ({', '.join(sorted(colour))})")
    return "; ".join(parts)


def set_aside(datasets: Sequence[Dataset]) -> str | None:
    """The warning naming the instances :func:`harmonisable` refuses, or None."""
    others = [ds for ds in datasets if not harmonisable(ds)]
    return (f"set aside {len(others)} instance(s) that are not grayscale images:"
            f" {_others(others)}") if others else None


def not_harmonisable(datasets: Sequence[Dataset]) -> str | None:
    """Why a series, valid as it may be, holds nothing to harmonise, or None: only SOP
    classes besides :data:`IMAGE_SOP_CLASSES` (reports, PET, dose, ...) or colour images,
    or localisers (scouts, topograms) only, or MR phase/real/imaginary images only. Headers
    suffice."""
    images = harmonisable_images(datasets)
    if datasets and not images:
        return f"not harmonisable: {_others(datasets)}"
    if images and all("LOCALIZER" in image_type(ds) for ds in images):
        return "not harmonisable: localiser images only"
    parts = {complex_part(ds, image_type(ds)) for ds in images}
    if images and "" not in parts:
        return f"not harmonisable: {' and '.join(sorted(parts))} images only"
    return None


# MR images that are not magnitude images, by ImageType value 3 or later as Siemens
# ("ORIGINAL\PRIMARY\P\ND") and Philips ("ORIGINAL\PRIMARY\PHASE MAP\P\FFE") write it;
# Enhanced MR says so in ComplexImageComponent, GE in its private image type (0043,102F).
NOT_MAGNITUDE = {"P": "phase", "PHASE": "phase", "PHASE MAP": "phase", "R": "real",
                 "REAL": "real", "I": "imaginary", "IMAGINARY": "imaginary"}
GE_IMAGE_TYPE = {1: "phase", 2: "real", 3: "imaginary"}  # 0 = magnitude


def _ge_image_type(ds: Dataset) -> int | None:
    try:
        value = ds.private_block(0x0043, "GEMS_PARM_01")[0x2F].value
    except (KeyError, ValueError):
        return None
    if isinstance(value, bytes):  # read without GE's private dictionary: SS, little endian
        return int.from_bytes(value[:2], "little", signed=True) if len(value) >= 2 else None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def complex_part(ds: Dataset, frame_type: Sequence[str], frame: int | None = None) -> str:
    """"phase", "real" or "imaginary" for an MR image that is one of those, else "" (a
    magnitude image, or nothing says otherwise): a magnitude model has nothing to say
    about phase, and a phase image beside each magnitude one doubles every position."""
    explicit = _first(ds, "MRImageFrameTypeSequence", "ComplexImageComponent", frame)
    if explicit:
        return NOT_MAGNITUDE.get(str(explicit).upper(), "")
    if str(ds.get("Modality", "")).upper() != "MR":
        return ""
    for value in frame_type[2:]:
        if value in NOT_MAGNITUDE:
            return NOT_MAGNITUDE[value]
    return GE_IMAGE_TYPE.get(_ge_image_type(ds) or 0, "")


def element_text(dataset: Any, keyword: str) -> str | None:
    """A tag's value as routing sees it: text, multi-values joined by backslash."""
    value = getattr(dataset, keyword, None) if keyword in dataset else None
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes):
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    if isinstance(value, Iterable):
        return "\\".join(str(v) for v in value)
    return str(value)


def image_type(ds: Dataset) -> list[str]:
    """ImageType's values, upper-case ([""] when absent)."""
    return (element_text(ds, "ImageType") or "").upper().split("\\")


class SeriesError(PipelineError):
    """A series that cannot become one volume; the message is the one-line reason."""


@dataclass(frozen=True)
class Frame:
    """One 2D image of a series: a single-frame instance, or one frame of a multi-frame one."""

    path: Path
    dataset: Dataset  # header only
    frame: int | None  # 0-based frame index in a multi-frame instance, None for single-frame
    position: tuple[float, float, float]
    orientation: tuple[float, ...]  # the six ImageOrientationPatient values
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    localiser: bool
    complex_part: str = ""  # "phase", "real", "imaginary" (:func:`complex_part`); "" magnitude

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation)
        return np.cross(o[:3], o[3:])


@dataclass(frozen=True)
class Volume:
    """A series as an array of real values with its geometry.

    ``array`` is float32 (slices, rows, cols); ``spacing`` is (slice, row, col) in mm;
    ``origin`` is the patient-space position of voxel (0, 0, 0); row ``a`` of ``direction``
    is the unit vector along array axis ``a`` (slice normal, column direction, row direction).
    ``frames`` lists the source image behind each slice, in slice order.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray
    frames: tuple[Frame, ...]
    padding: np.ndarray | None  # True where the source held padding (see _padding_mask)
    warnings: tuple[str, ...] = ()

    @property
    def datasets(self) -> tuple[Dataset, ...]:
        return tuple(f.dataset for f in self.frames)


def find_series(root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Every DICOM image file under ``root``, grouped by SeriesInstanceUID (sorted paths)."""
    groups: dict[str, list[Path]] = {}
    base = Path(root)
    paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    for path in paths:
        if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid:
            groups.setdefault(uid, []).append(path)
    return dict(sorted(groups.items()))


def readable_files(files: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[str]]:
    """The files whose bytes parse completely in their transfer syntax, and a line for each
    that does not: the rule the node receives instances by (:mod:`pipelines.structure`),
    so a folder harmonised offline leaves out exactly what the node would have refused."""
    good, broken = [], []
    for path in map(Path, files):
        try:
            walk_file(path)
        except (StructureError, OSError) as exc:
            broken.append(f"{path.name}: {exc}")
            continue
        good.append(path)
    return good, broken


def read_headers(files: Iterable[str | os.PathLike[str]]) -> list[Dataset]:
    """The files' datasets without pixel data (enough for routing)."""
    out = []
    for path in files:
        try:
            out.append(dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise SeriesError(f"{Path(path).name}: not readable as DICOM: {exc}") from None
    return out


def _first(ds: Dataset, group: str, keyword: str, frame: int | None) -> object:
    """A functional-group attribute: per-frame if present there, else shared, else top level."""
    if frame is not None:
        for seq_kw in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            items = ds.get(seq_kw)
            if not items:
                continue
            item = items[frame] if seq_kw.startswith("Per") else items[0]
            inner = item.get(group)
            if inner and keyword in inner[0]:
                return inner[0].get(keyword)
    return ds.get(keyword)


def _frames_of(path: Path, ds: Dataset) -> list[Frame]:
    where = path.name
    multi = "PerFrameFunctionalGroupsSequence" in ds
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if count > 1 and not multi:
        raise SeriesError(f"{where}: {count} frames without per-frame functional groups")
    instance_type = image_type(ds)
    frames = []
    for index in range(count) if multi else [None]:
        position = _first(ds, "PlanePositionSequence", "ImagePositionPatient", index)
        orientation = _first(ds, "PlaneOrientationSequence", "ImageOrientationPatient", index)
        spacing = _first(ds, "PixelMeasuresSequence", "PixelSpacing", index)
        if not position or not orientation or len(orientation) != 6:
            raise SeriesError(f"{where}: no ImagePositionPatient/ImageOrientationPatient"
                              " (cannot place the image in space)")
        if not spacing or len(spacing) != 2:
            raise SeriesError(f"{where}: no PixelSpacing")
        slope = _first(ds, "PixelValueTransformationSequence", "RescaleSlope", index)
        intercept = _first(ds, "PixelValueTransformationSequence", "RescaleIntercept", index)
        frame_type = instance_type
        if multi:
            for kw in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence"):
                value = _first(ds, kw, "FrameType", index)
                if value:
                    frame_type = [str(v).upper() for v in value]
        frames.append(Frame(
            path=path, dataset=ds, frame=index,
            position=tuple(float(v) for v in position),
            orientation=tuple(float(v) for v in orientation),
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            slope=float(slope if slope not in (None, "") else 1.0),
            intercept=float(intercept if intercept not in (None, "") else 0.0),
            localiser="LOCALIZER" in frame_type,
            complex_part=complex_part(ds, frame_type, index)))
    return frames


def _rounded(values: Sequence[float]) -> str:
    """Values as text at 1e-4 precision (-0 folded into 0), for grouping and for messages."""
    return "\\".join(f"{round(v, 4) + 0.0:g}" for v in values)


def _describe(counter: Counter[object], unit: str = "image") -> str:
    return ", ".join(f"{k} ({n} {unit}{'s' if n != 1 else ''})" for k, n in counter.most_common())


def check_frames(frames: Sequence[Frame]) -> tuple[list[Frame], list[str]]:
    """Validate and sort frames along the slice normal; returns them and any warnings.

    Raises :class:`SeriesError` for what would make the volume wrong: non-monochrome pixels,
    mixed SOP classes, image sizes, orientations, pixel spacings or frames of reference,
    and two images at one position.
    """
    warnings: list[str] = []
    if not frames:
        raise SeriesError("no images in series")
    for f in frames:
        photometric = str(f.dataset.get("PhotometricInterpretation", ""))
        if photometric not in MONOCHROME or \
                int(f.dataset.get("SamplesPerPixel", 1)) != 1:
            shown = photometric or "<absent>"
            raise SeriesError(f"{f.path.name}: PhotometricInterpretation {shown} is not"
                              " monochrome")
    localisers = [f for f in frames if f.localiser]
    if localisers:
        frames = [f for f in frames if not f.localiser]
        if not frames:
            raise SeriesError("only localiser images in series")
        warnings.append(f"split off {len(localisers)} localiser image(s)")
    others = [f for f in frames if f.complex_part]
    if others:
        frames = [f for f in frames if not f.complex_part]
        kinds = " and ".join(sorted({f.complex_part for f in others}))
        if not frames:
            raise SeriesError(f"only {kinds} images in series, no magnitude images")
        warnings.append(f"set aside {len(others)} {kinds} image(s): only magnitude images"
                        " are harmonised")
    checks = (
        ("SOP classes", lambda f: str(f.dataset.SOPClassUID)),
        ("image sizes", lambda f: f"{f.dataset.Rows}x{f.dataset.Columns}"),
        ("frames of reference", lambda f: str(f.dataset.get("FrameOfReferenceUID", ""))),
        ("orientations", lambda f: _rounded(f.orientation)),
        ("pixel spacings", lambda f: _rounded(f.pixel_spacing)),
    )
    for label, key in checks:
        seen = Counter(key(f) for f in frames)
        if len(seen) > 1:
            raise SeriesError(f"mixed {label}: {_describe(seen)}")
    normal = frames[0].normal
    along = np.array([np.dot(f.position, normal) for f in frames])
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    along = along[order]
    steps = np.diff(along)
    if len(steps):
        dupes = np.flatnonzero(steps < 1e-3)
        if len(dupes):
            where = along[dupes[0]]
            raise SeriesError(f"duplicate slice positions: {len(dupes) + 1} images at"
                              f" {where:.3f} mm along the normal (several echoes, phases or"
                              " copies in one series?)")
        median = float(np.median(steps))
        uneven = np.flatnonzero(np.abs(steps - median) > GAP_TOLERANCE * median + 1e-3)
        if len(uneven):
            i = int(uneven[0])
            warnings.append(f"uneven slice spacing: {steps[i]:.3f} mm between slices {i} and"
                            f" {i + 1} (median {median:.3f} mm; {len(uneven)} such step(s))")
    return frames, warnings


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values as (frames, rows, cols), whatever the transfer syntax."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the reason is what matters
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID", "?") if meta is not None else "?"
        raise SeriesError(f"{path.name}: cannot decode pixel data ({syntax}): {exc}") from None
    return pixels.reshape(-1, *pixels.shape[-2:])


def lossy_compression(ds: Dataset) -> tuple[bool, str | None]:
    """Whether ``ds``'s pixels were ever lossy compressed, and the Lossy Image Compression
    Method its own transfer syntax implies (None when that syntax is not lossy)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    flag = ds.get("LossyImageCompression")
    method = LOSSY_METHODS.get(syntax)
    if syntax in (JPEG2000, HTJ2K) and flag == "00":
        method = None  # the header says this JPEG 2000 stream is reversible
    return flag == "01" or method is not None, method


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Where ``stored`` is padding: the Pixel Padding range when one is given, else at or
    beyond PixelPaddingValue on the dark side (below for MONOCHROME2, above for MONOCHROME1,
    PS3.3 C.7.5.1.1.2), with :data:`LOSSY_PADDING_TOLERANCE` for lossy sources."""
    if "PixelPaddingValue" not in ds:
        return None
    pad = int(ds.PixelPaddingValue)
    if "PixelPaddingRangeLimit" in ds:
        limit = int(ds.PixelPaddingRangeLimit)
        return (stored >= min(pad, limit)) & (stored <= max(pad, limit))
    tolerance = int((1 << int(ds.BitsStored)) * LOSSY_PADDING_TOLERANCE) \
        if lossy_compression(ds)[0] else 0
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        return stored >= pad - tolerance
    return stored <= pad + tolerance


def load_series(files: Iterable[str | os.PathLike[str]]) -> Volume:
    """Read, check, sort, decode and rescale one series into a :class:`Volume`.

    Instances :func:`harmonisable` refuses (a scanner's raw data, a colour screen) are set
    aside with a warning, as localisers are. The datasets kept in ``frames`` have their
    pixel data removed.
    """
    frames: list[Frame] = []
    aside: list[Dataset] = []
    for name in files:
        path = Path(name)
        try:
            ds = dcmread(path, defer_size=DEFER_SIZE)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise SeriesError(f"{path.name}: not readable as DICOM: {exc}") from None
        if not harmonisable(ds):
            aside.append(ds)
            continue
        if "PixelData" not in ds:
            raise SeriesError(f"{path.name}: not an image (no PixelData)")
        frames.extend(_frames_of(path, ds))
    if not frames and (why := not_harmonisable(aside)):
        raise SeriesError(why)
    frames, warnings = check_frames(frames)
    if note := set_aside(aside):
        warnings.insert(0, note)
    decoded: dict[Path, np.ndarray] = {}
    for f in frames:
        if f.path not in decoded:
            decoded[f.path] = _decode(f.dataset, f.path)
            del f.dataset.PixelData
    rows, cols = int(frames[0].dataset.Rows), int(frames[0].dataset.Columns)
    array = np.empty((len(frames), rows, cols), dtype=np.float32)
    masks = []
    for i, f in enumerate(frames):
        stored = decoded[f.path][f.frame or 0]
        np.multiply(stored, np.float32(f.slope), out=array[i], casting="unsafe")
        array[i] += np.float32(f.intercept)
        masks.append(_padding_mask(f.dataset, stored))
    padding = None if all(m is None for m in masks) else np.stack(
        [m if m is not None else np.zeros((rows, cols), bool) for m in masks])
    first = frames[0]
    orientation = np.asarray(first.orientation)
    positions = [np.dot(f.position, first.normal) for f in frames]
    steps = np.diff(positions)
    thickness = float(first.dataset.get("SliceThickness") or 1.0)
    slice_spacing = float(np.median(steps)) if len(steps) else thickness
    for message in warnings:
        log.warning("series_warning", series_uid=str(first.dataset.get("SeriesInstanceUID", "")),
                    reason=message)
    return Volume(
        array=array,
        spacing=(slice_spacing, first.pixel_spacing[0], first.pixel_spacing[1]),
        origin=np.asarray(first.position, dtype=float),
        direction=np.stack([first.normal, orientation[3:], orientation[:3]]),
        frames=tuple(frames), padding=padding, warnings=tuple(warnings))
