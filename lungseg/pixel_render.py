"""Decode a DICOM frame at the resolution inference needs, and render it through a lookup table.

Two savings on the DICOM path, both exact or measured:

* **Reduced-resolution decoding.** The model sees 256 x 256; a 2,000-pixel radiograph
  is decoded, rendered and drawn at ``1 / 2**level`` of its size, the coarsest power of
  two whose short side stays at least ``min_side`` pixels. JPEG 2000 code streams are
  decoded at that resolution level directly (OpenJPEG through ``glymur``: the wavelet
  low-pass image, no full-size decode at all); other encodings are decoded in full and
  their stored values reduced by block means (:func:`block_means`) to the same size before
  rendering. ``min_side <= 0`` keeps full resolution.
* **Lookup-table rendering.** Modality LUT, VOI LUT/window, polarity and the scaling to
  [0, 1] are elementwise, so they are computed once per stored value present in the
  image (in float64, exactly as before) and applied with one float32 gather: the same
  pixels as rendering every pixel, bit for bit, at a fraction of the cost.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

J2K_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
})
MAX_LUT_ENTRIES = 1 << 20  # stored-value range above which pixels are rendered one by one
DECODE_THREADS = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))

_glymur_lock = threading.Lock()
_glymur_state: dict[str, Any] = {}


def reduction_level(rows: int, columns: int, min_side: int, max_level: int = 8) -> int:
    """The largest ``level`` with ``ceil(min(rows, columns) / 2**level) >= min_side`` (0 when ``min_side <= 0``)."""
    if min_side <= 0:
        return 0
    short = min(rows, columns)
    level = 0
    while level < max_level and math.ceil(short / 2 ** (level + 1)) >= min_side:
        level += 1
    return level


def reduced_shape(rows: int, columns: int, level: int) -> tuple[int, int]:
    """The size of a JPEG 2000 resolution level: ``ceil(n / 2**level)`` per axis."""
    factor = 2**level
    return math.ceil(rows / factor), math.ceil(columns / factor)


def _glymur() -> Any:
    """``glymur`` with OpenJPEG's decoder threads set, or ``None`` where it (or libopenjp2) is missing."""
    with _glymur_lock:
        if "module" not in _glymur_state:
            try:
                import glymur

                if glymur.version.openjpeg_version_tuple < (2, 3, 0):
                    raise ImportError(f"OpenJPEG {glymur.version.openjpeg_version} is older than 2.3")
                glymur.set_option("lib.num_threads", DECODE_THREADS)
                _glymur_state["module"] = glymur
            except Exception as exc:  # ImportError, or OSError when libopenjp2 cannot be loaded
                log.info("reduced-resolution JPEG 2000 decoding unavailable (%s); decoding in full", exc)
                _glymur_state["module"] = None
        return _glymur_state["module"]


def warm_up_decoders() -> bool:
    """Load now every library the decode path would otherwise load on first use.

    A decode worker calls this before it takes any input and before its memory limit is
    set: an import that first happens while a hostile file fills the memory can fail
    ("failed to map segment") and be mistaken for a bad file, or leave JPEG 2000
    reduced-resolution decoding off for the worker's life. Returns whether reduced-resolution
    JPEG 2000 decoding is available.
    """
    import pydicom.pixels.decoders  # noqa: F401  (the codec plugins register on import)

    glymur = _glymur()
    if glymur is None:
        return False
    import numpy.ctypeslib  # noqa: F401  (glymur hands OpenJPEG's buffers to numpy through it)

    return True


def j2k_reduced(frame: bytes, level: int) -> np.ndarray | None:
    """Decode a JPEG 2000 code stream at resolution ``level`` (clamped to the stream's levels).

    Returns ``None`` when glymur/OpenJPEG is not available. OpenJPEG reads files, so the
    code stream goes through a temporary file (a few MB, removed at once).
    """
    glymur = _glymur()
    if glymur is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".j2k", prefix="lungseg-") as handle:
        handle.write(frame)
        handle.flush()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # glymur warns about benign code stream quirks
            image = glymur.Jp2k(handle.name)
            codestream = image.get_codestream(header_only=True)
            cod = next((s for s in codestream.segment if s.marker_id == "COD"), None)
            if cod is not None:
                level = min(level, int(cod.num_res))
            step = 2**level
            return np.ascontiguousarray(image[::step, ::step])


def first_frame(ds: Dataset) -> bytes:
    """The encapsulated code stream of a single-frame data set."""
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def stored_values(ds: Dataset, min_side: int) -> tuple[np.ndarray, int]:
    """The frame's stored values, decoded at JPEG 2000 resolution ``level`` where that applies.

    Returns ``(array, level)``; ``level`` is 0 when the frame was decoded at full size
    (not JPEG 2000, no reduction wanted, or the reduced decoder unavailable or failing).
    """
    rows, columns = int(ds.Rows), int(ds.Columns)
    level = reduction_level(rows, columns, min_side)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if level and syntax in J2K_SYNTAXES and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        try:
            reduced = j2k_reduced(first_frame(ds), level)
        except Exception as exc:  # anything odd in the stream: the full decoder has the last word
            log.info("reduced-resolution JPEG 2000 decode failed (%s: %s); decoding in full", type(exc).__name__, exc)
            reduced = None
        if reduced is not None and reduced.ndim == 2:
            actual = round(math.log2(max(1.0, rows / reduced.shape[0])))
            if reduced.shape == reduced_shape(rows, columns, actual):
                return apply_pixel_representation(reduced, ds), actual
            log.info("reduced JPEG 2000 frame is %s, not a resolution level of %dx%d; decoding in full",
                     reduced.shape, rows, columns)
    if level:
        full = _uncorrected_view(ds) if not ds.file_meta.TransferSyntaxUID.is_encapsulated else None
        if full is None:
            full = ds.pixel_array
        if full.ndim == 2 and full.dtype in _AREA_DTYPES:
            # the same reduction as a JPEG 2000 resolution level: area means of the stored values
            return block_means(full, level), level
    return ds.pixel_array, 0


def _uncorrected_view(ds: Dataset) -> np.ndarray | None:
    """The uncompressed frame as a read-only view of the file's bytes, where that is exactly
    what pydicom's decoder returns; else ``None``.

    pydicom copies the frame to clear the bits above Bits Stored (two passes over a 7 MB
    image). Where every value already lies in the stored range, clearing changes nothing,
    and one min/max pass over the view shows that.
    """
    from pydicom.pixels import pixel_array

    try:
        view = pixel_array(ds, view_only=True, correct_unused_bits=False)
    except Exception:  # pydicom's own path decides (and names) what is wrong
        return None
    bits_stored, bits_allocated = int(ds.get("BitsStored", 0) or 0), int(ds.get("BitsAllocated", 0) or 0)
    if view.dtype.kind not in "iu" or view.size == 0 or not 0 < bits_stored <= bits_allocated:
        return None
    if bits_stored == bits_allocated:
        return view
    if view.dtype.kind == "u":
        low, high = 0, (1 << bits_stored) - 1
    else:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return view if low <= int(view.min()) and int(view.max()) <= high else None


def block_means(image: np.ndarray, level: int) -> np.ndarray:
    """``image`` reduced to resolution ``level`` (``ceil(n / 2**level)`` per axis) by block means.

    Each output pixel is the mean of its ``2**level`` square block; blocks cut by the bottom or
    right edge average the pixels they have. Every ``cv2.resize`` call here has an integer scale,
    which OpenCV's area filter runs about 5 times faster than a fractional one.
    """
    if level <= 0:
        return image
    factor = 2**level
    rows, columns = image.shape[:2]
    out_rows, out_columns = reduced_shape(rows, columns, level)
    whole_rows, whole_columns = rows // factor, columns // factor
    out = np.empty((out_rows, out_columns), dtype=image.dtype)

    def reduce(block: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if block.strides[-1] != block.itemsize:  # OpenCV takes row-strided views as they are, not others
            block = np.ascontiguousarray(block)
        return cv2.resize(block, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0])

    cut_rows, cut_columns = whole_rows * factor, whole_columns * factor
    if whole_rows and whole_columns:
        out[:whole_rows, :whole_columns] = reduce(image[:cut_rows, :cut_columns], (whole_columns, whole_rows))
    if out_rows > whole_rows and whole_columns:
        out[whole_rows:, :whole_columns] = reduce(image[cut_rows:, :cut_columns], (whole_columns, 1))
    if out_columns > whole_columns and whole_rows:
        out[:whole_rows, whole_columns:] = reduce(image[:cut_rows, cut_columns:], (1, whole_rows))
    if out_rows > whole_rows and out_columns > whole_columns:
        out[whole_rows:, whole_columns:] = reduce(image[cut_rows:, cut_columns:], (1, 1))
    return out


_AREA_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16))


def apply_pixel_representation(array: np.ndarray, ds: Dataset) -> np.ndarray:
    """Give OpenJPEG's output the dtype pydicom's decoder would (signed when PixelRepresentation is 1)."""
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    bits = int(ds.get("BitsAllocated", 16) or 16)
    dtype = np.dtype(f"{'i' if signed else 'u'}{max(1, bits // 8)}")
    return array.astype(dtype, copy=False) if array.dtype != dtype else array


def render_with_lut(stored: np.ndarray, render: Callable[[np.ndarray], tuple[np.ndarray, Any]],
                    ) -> tuple[np.ndarray, Any] | None:
    """Apply an elementwise ``render`` (stored values -> float32 [0, 1], info) through a table.

    ``render`` sees each stored value present in the image exactly once, so statistics it
    takes (min/max) are those of the image. Returns ``None`` where a table does not fit
    (non-integer samples, or a value range over :data:`MAX_LUT_ENTRIES`).
    """
    if stored.dtype.kind not in "iu" or stored.size == 0:
        return None
    lo, hi = int(stored.min()), int(stored.max())
    if hi - lo + 1 > MAX_LUT_ENTRIES:
        return None
    if stored.dtype.kind == "u":
        offsets = stored - stored.dtype.type(lo) if lo else stored
    else:
        offsets = stored.astype(np.int32 if stored.dtype.itemsize <= 2 else np.int64) - lo
    present = np.flatnonzero(np.bincount(offsets.ravel(), minlength=hi - lo + 1))
    values = (present + lo).astype(stored.dtype)
    rendered, info = render(values)
    table = np.zeros(hi - lo + 1, dtype=np.float32)
    table[present] = rendered
    return table[offsets], info
