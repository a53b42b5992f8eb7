"""The single source of truth for turning a radiograph into model input, and back.

Steps (the donor's, see Buda et al.): letterbox the image into a square, resize to
``INPUT_SIZE``, rescale intensities so the 10th percentile maps to 0 and the 99th
to 1 (clipped), standardise to zero mean / unit std, repeat to 3 channels.
Percentiles and moments are computed over the image content only, so the
letterbox padding never shifts them. :class:`Geometry` maps model-space arrays
back to the native ``rows x columns``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

INPUT_SIZE = 256
PERCENTILE_LOW = 10.0
PERCENTILE_HIGH = 99.0
CHANNELS = 3

PREPROCESSING_PARAMS = {
    "input_size": INPUT_SIZE,
    "letterbox": "centred, pad value = rescaled 0",
    "resize": "cv2.INTER_AREA (downscale) / cv2.INTER_LINEAR (upscale)",
    "percentile_low": PERCENTILE_LOW,
    "percentile_high": PERCENTILE_HIGH,
    "standardise": "content mean/std",
    "channels": CHANNELS,
    "photometric": "MONOCHROME2 (lungs dark)",
}


@dataclass(frozen=True)
class Geometry:
    """Where the native image sits inside the square model input."""

    rows: int
    columns: int
    size: int
    top: int
    left: int
    content_rows: int
    content_columns: int

    @classmethod
    def for_shape(cls, rows: int, columns: int, size: int = INPUT_SIZE) -> Geometry:
        if rows < 1 or columns < 1:
            raise ValueError(f"image of shape {rows}x{columns} has no pixels")
        scale = size / max(rows, columns)
        content_rows = max(1, min(size, round(rows * scale)))
        content_columns = max(1, min(size, round(columns * scale)))
        return cls(
            rows=rows,
            columns=columns,
            size=size,
            top=(size - content_rows) // 2,
            left=(size - content_columns) // 2,
            content_rows=content_rows,
            content_columns=content_columns,
        )

    @property
    def content(self) -> tuple[slice, slice]:
        return (
            slice(self.top, self.top + self.content_rows),
            slice(self.left, self.left + self.content_columns),
        )

    def to_model(self, array: np.ndarray, *, nearest: bool = False, fill: float = 0.0) -> np.ndarray:
        """Letterbox a native ``rows x columns`` array into ``size x size``."""
        if array.shape[:2] != (self.rows, self.columns):
            raise ValueError(f"array shape {array.shape[:2]} != geometry {(self.rows, self.columns)}")
        return self.fit(array, nearest=nearest, fill=fill)

    def fit(self, array: np.ndarray, *, nearest: bool = False, fill: float = 0.0) -> np.ndarray:
        """Letterbox an array of the native image at any resolution (e.g. a reduced decode)."""
        shrinking = self.content_rows <= array.shape[0]
        interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        resized = cv2.resize(array, (self.content_columns, self.content_rows), interpolation=interp)
        out = np.full((self.size, self.size), fill, dtype=array.dtype)
        out[self.content] = resized
        return out

    def to_native(self, array: np.ndarray, *, nearest: bool = False) -> np.ndarray:
        """Map a ``size x size`` model-space array back to native ``rows x columns``."""
        if array.shape[:2] != (self.size, self.size):
            raise ValueError(f"array shape {array.shape[:2]} != model size {self.size}")
        crop = np.ascontiguousarray(array[self.content])
        interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        return cv2.resize(crop, (self.columns, self.rows), interpolation=interp)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def normalise(square: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Donor intensity normalisation of a letterboxed image; returns float32 ``size x size``."""
    content = square[geometry.content]
    lo, hi = np.percentile(content, (PERCENTILE_LOW, PERCENTILE_HIGH))
    scale = (hi - lo) if hi > lo else 1.0
    rescaled = np.clip((square - lo) / scale, 0.0, 1.0).astype(np.float32)
    rescaled_content = rescaled[geometry.content]
    mean = float(rescaled_content.mean())
    std = float(rescaled_content.std()) or 1.0
    out = np.full(square.shape, (0.0 - mean) / std, dtype=np.float32)
    out[geometry.content] = (rescaled_content - mean) / std
    return out


def preprocess(pixels: np.ndarray, size: int = INPUT_SIZE,
               native_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, Geometry]:
    """MONOCHROME2 float image (rows x columns) -> model input ``(3, size, size)`` float32.

    ``native_shape`` is the source's size when ``pixels`` were decoded at a reduced
    resolution: the geometry (and so every mask mapped back) follows the source.
    """
    square, geometry = letterbox(pixels, size, native_shape)
    single = normalise(square, geometry)
    return np.repeat(single[None], CHANNELS, axis=0), geometry


def letterbox(pixels: np.ndarray, size: int = INPUT_SIZE,
              native_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, Geometry]:
    """The first step of :func:`preprocess`: the float32 ``size x size`` square before normalisation."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {pixels.shape}")
    rows, columns = native_shape or pixels.shape
    geometry = Geometry.for_shape(rows, columns, size)
    return geometry.fit(pixels.astype(np.float32, copy=False)), geometry


def preprocess_batch(images: list[np.ndarray], size: int = INPUT_SIZE,
                     native_shapes: list[tuple[int, int] | None] | None = None) -> tuple[np.ndarray, list[Geometry]]:
    """Preprocess several images into one ``(N, 3, size, size)`` batch."""
    shapes = native_shapes or [None] * len(images)
    tensors, geometries = zip(*(preprocess(image, size, shape) for image, shape in zip(images, shapes, strict=True)),
                              strict=True)
    return np.stack(tensors), list(geometries)
