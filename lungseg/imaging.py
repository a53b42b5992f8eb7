"""Decode radiographs (PNG, JPEG, DICOM) to a presentation-ready MONOCHROME2 image.

Every consumer — training, export calibration, ``lungseg-segment``, the edge
runtime and the benchmarks — reads images through :func:`read_image`, so the
model always sees the same rendering of the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lungseg.dicom_decode import read_dicom
from lungseg.radiograph import Radiograph, UnreadableImageError, to_unit_range

RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}


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
    return read_dicom(path)


__all__ = ["RASTER_SUFFIXES", "Radiograph", "UnreadableImageError", "read_image", "read_raster", "to_unit_range"]
