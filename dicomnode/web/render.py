"""Pixels to pictures (pure): an image's stored values to modality values, a window to
8-bit grey, a difference picture, PNG or JPEG bytes. For the console's viewer and
WADO-RS rendered frames."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


@dataclass(frozen=True)
class Window:
    """A linear VOI window (PS3.3 C.11.2.1.2): values ``center`` +- ``width`` / 2."""

    center: float
    width: float

    def grey(self, values: np.ndarray) -> np.ndarray:
        low = self.center - self.width / 2
        scaled = (values.astype(np.float64) - low) / max(self.width, 1e-6)
        return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# name -> window in Hounsfield units; MR (no absolute units) has only "auto"
CT_PRESETS = {"soft tissue": Window(40, 400), "lung": Window(-600, 1500),
              "bone": Window(300, 2000), "brain": Window(40, 80)}
AUTO = "auto"


def auto_window(values: np.ndarray) -> Window:
    """The window spanning the 1st to 99th percentile: the image's own contrast."""
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    return Window((low + high) / 2, max(high - low, 1.0))


def presets(modality: str) -> list[str]:
    return [*CT_PRESETS, AUTO] if modality == "CT" else [AUTO]


def preset_window(name: str, modality: str, values: np.ndarray) -> Window:
    """A named preset (an unknown name, or a modality without it: auto)."""
    if modality == "CT" and name in CT_PRESETS:
        return CT_PRESETS[name]
    return auto_window(values)


def _rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    """Slope and intercept: top level, else the frame's or the shared functional groups."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    for keyword, item in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(keyword)
        if groups and len(groups) > item and "PixelValueTransformationSequence" in groups[item]:
            pvt = groups[item].PixelValueTransformationSequence[0]
            return float(pvt.get("RescaleSlope", 1) or 1), float(pvt.get("RescaleIntercept", 0)
                                                                 or 0)
    return 1.0, 0.0


def frame_count(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def modality_values(ds: Dataset, frame: int = 0) -> np.ndarray:
    """Frame ``frame`` (0-based) of a greyscale image in modality units (HU for CT), or
    its colour pixels as they are (rows, columns, 3)."""
    pixels = ds.pixel_array
    if frame_count(ds) > 1:
        pixels = pixels[frame]
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        return pixels
    slope, intercept = _rescale(ds, frame)
    return pixels.astype(np.float32) * slope + intercept


def picture(ds: Dataset, values: np.ndarray, window: Window) -> np.ndarray:
    """8-bit pixels to show: greyscale windowed (MONOCHROME1 inverted), colour scaled."""
    if values.ndim == 3:
        top = float(values.max()) or 1.0
        return values.astype(np.uint8) if top <= 255 else (values / top * 255).astype(np.uint8)
    grey = window.grey(values)
    return 255 - grey if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1" else grey


def difference(before: np.ndarray, after: np.ndarray, half_range: float) -> np.ndarray:
    """``after - before`` as grey: mid-grey is no change, white +``half_range`` or more."""
    return Window(0.0, 2 * half_range).grey(after.astype(np.float64) - before)


def encode(pixels: np.ndarray, kind: str = "png") -> bytes:
    """PNG (lossless) or JPEG (quality 90) bytes of 8-bit pixels."""
    out = io.BytesIO()
    image = Image.fromarray(pixels)
    if kind == "jpeg":
        image.save(out, format="JPEG", quality=90)
    else:
        image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _first(value: object) -> float:
    """A DS value's first number (WindowCenter may hold several windows)."""
    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def dicom_window(ds: Dataset, values: np.ndarray) -> Window:
    """The image's own first VOI window (WindowCenter/Width), else :func:`auto_window`."""
    try:
        window = Window(_first(ds.WindowCenter), _first(ds.WindowWidth))
    except (AttributeError, TypeError, ValueError, IndexError):
        return auto_window(values)
    return window if window.width > 0 else auto_window(values)
