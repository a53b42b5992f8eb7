"""Decode radiographs (PNG, JPEG, DICOM) to a presentation-ready MONOCHROME2 image.

Every consumer — training, export calibration, ``lungseg-segment``, the edge
runtime and the benchmarks — reads images through :func:`read_image`, so the
model always sees the same rendering of the same file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pydicom import Dataset

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}


class UnreadableImageError(ValueError):
    """An input that cannot be turned into a radiograph; the message names file and reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class Radiograph:
    """A decoded radiograph.

    ``pixels`` is float32 in [0, 1], MONOCHROME2 (higher = brighter = denser),
    shape ``(rows, columns)`` of the source. ``pixel_spacing_mm`` is
    ``(row, column)`` spacing at the detector or patient, or ``None`` when the
    file gives none that is usable (missing or zero). ``native_shape`` is the source's
    ``(rows, columns)`` when ``pixels`` were decoded at a reduced resolution (the spacing
    always describes the source grid); ``None`` means ``pixels`` are at native size.
    """

    pixels: np.ndarray
    source: str
    pixel_spacing_mm: tuple[float, float] | None = None
    dataset: Dataset | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    native_shape: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of ``pixels`` (reduced where the decoder reduced it)."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])

    @property
    def source_shape(self) -> tuple[int, int]:
        """The source image's ``(rows, columns)``: the grid native-size masks are drawn on."""
        return self.native_shape if self.native_shape is not None else self.shape


def to_unit_range(array: np.ndarray) -> np.ndarray:
    """Scale an array linearly to float32 [0, 1] (a constant image becomes zeros)."""
    array = array.astype(np.float32, copy=False)
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros_like(array, dtype=np.float32)
    return (array - lo) / (hi - lo)


def read_raster(path: str | Path) -> Radiograph:
    """Read an 8- or 16-bit grayscale (or colour, converted to gray) PNG/JPEG."""
    import cv2

    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise UnreadableImageError(path, "file not found")
    if data.size == 0:
        raise UnreadableImageError(path, "empty file")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:  # OpenCV raises on some malformed data instead of returning None
        image = None
    if image is None:
        raise UnreadableImageError(path, "not a decodable PNG/JPEG image")
    if image.ndim == 3:
        if image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
        else:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.dtype == np.uint8:
        pixels = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
        pixels = image.astype(np.float32) / 65535.0
    else:
        raise UnreadableImageError(path, f"unsupported sample type {image.dtype}")
    return Radiograph(pixels=pixels, source=str(path), facts={"format": path.suffix.lower()[1:]})


def read_image(path: str | Path) -> Radiograph:
    """Read a PNG/JPEG by extension, anything else as DICOM (with or without file meta)."""
    path = Path(path)
    if path.suffix.lower() in RASTER_SUFFIXES:
        return read_raster(path)
    from lungseg.dicom_decode import read_dicom

    return read_dicom(path)
