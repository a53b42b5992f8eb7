"""Decode a DICOM radiograph to a presentation-ready MONOCHROME2 :class:`~lungseg.imaging.Radiograph`.

The grayscale pipeline follows PS3.3 C.11 and agrees with dcmtk's ``dcm2pnm``:

1. stored values -> Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence);
2. -> VOI LUT Sequence, else the first Window Center/Width, else the data's min/max.
   A window that maps every pixel to one value (it lies wholly outside the data) is
   ignored in favour of min/max, with a warning;
3. -> polarity: **invert iff Presentation LUT Shape is INVERSE, or, where the file gives
   no valid Presentation LUT Shape, iff Photometric Interpretation is MONOCHROME1**.
   The shape, where present, already accounts for the photometric interpretation
   (the DX module requires INVERSE with MONOCHROME1 and IDENTITY with MONOCHROME2), so
   MONOCHROME1 + INVERSE is inverted once, not twice; MONOCHROME1 + IDENTITY is not
   inverted; MONOCHROME2 + INVERSE is inverted. This is exactly dcmtk's behaviour;
4. -> linear scaling to float32 [0, 1] (:func:`~lungseg.imaging.to_unit_range`).

Files whose stored polarity is itself unconventional (lungs stored bright in a
MONOCHROME2 file) are rendered as the file says; no content heuristic is applied.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from lungseg.pixel_render import block_means, reduction_level, render_with_lut, stored_values
from lungseg.radiograph import Radiograph, UnreadableImageError, to_gray8, to_unit_range

logger = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY_UID = "1.2.840.10008.1.3.10"
DX_FOR_PROCESSING_UID = "1.2.840.10008.5.1.4.1.1.1.1.1"
SUPPORTED_MODALITIES = frozenset({"CR", "DX"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL"})
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})

# Elements at least one of which any image-bearing DICOM data set has; a file read with
# ``force=True`` that has none of them is not DICOM (or lost everything to truncation).
_CORE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "Modality", "Rows", "Columns", "PixelData")


class FrameDecoder(Protocol):
    """Decodes a data set's frame at full size in place of pydicom's decoders (e.g. on the GPU)."""

    label: str

    def stored_values(self, ds: Dataset) -> np.ndarray: ...


class UnsupportedDicomError(UnreadableImageError):
    """A readable DICOM file that is not a single-frame, presentation-ready frontal CR/DX radiograph.

    ``code`` is one of ``"dicomdir"``, ``"no_pixel_data"``, ``"unsupported_modality"``,
    ``"for_processing"``, ``"lateral_view"``, ``"rgb"`` (not single-sample
    MONOCHROME1/2) or ``"multiframe"``.
    """

    def __init__(self, path: str | Path, reason: str, code: str):
        super().__init__(path, reason)
        self.code = code


@dataclass(frozen=True)
class DecodeLimits:
    """What a file may claim before any decoding work is done (checked from the header alone).

    Exceeding one raises :class:`UnsupportedDicomError` with code ``file_too_large``,
    ``too_many_pixels``, ``too_many_frames``, ``pixel_data_too_large`` or
    ``codestream_size_mismatch`` (a JPEG / JPEG 2000 code stream larger than Rows x Columns).
    """

    max_file_bytes: int = 512 * 1024 * 1024
    max_pixels: int = 50_000_000  # per frame: rows x columns
    max_frames: int = 64
    max_pixel_bytes: int = 256 * 1024 * 1024  # decoded size of all frames


DEFAULT_LIMITS = DecodeLimits()


def read_dicom(path: str | Path, *, data: bytes | None = None, limits: DecodeLimits | None = None,
               min_side: int = 0, display: bool = False, frame_decoder: FrameDecoder | None = None) -> Radiograph:
    """Read a DICOM file (with or without preamble/file meta, any suffix) as a radiograph.

    ``data`` is the file's content when the caller already read it (``path`` then only
    names it in messages). The header is checked against ``limits`` before any pixel
    is decoded, and every element is parsed, so a malformed one fails here, not later.
    ``min_side > 0`` decodes and renders at a reduced resolution whose short side stays
    ``>= min_side`` (``Radiograph.native_shape`` keeps the source size); 0 keeps full size.
    ``display`` also keeps the presentation-ready image at full resolution as 8 bits
    (``Radiograph.display``, for the overlay): the file is then decoded once at full size and
    ``pixels`` are its area reduction.
    ``frame_decoder`` (e.g. :class:`lungseg.gpu_decode.GpuFrameDecoder`) decodes the frame at full
    size instead of pydicom's decoders; what it raises propagates (the caller falls back to the CPU decoder).
    Raises :class:`UnsupportedDicomError` for DICOM this tool does not segment and
    :class:`~lungseg.imaging.UnreadableImageError` for anything else that fails.
    """
    path = Path(path)
    limits = limits or DEFAULT_LIMITS
    if data is None:
        if not path.is_file():
            raise UnreadableImageError(path, "is a directory" if path.is_dir() else "file not found")
        size = path.stat().st_size
        if size > limits.max_file_bytes:
            raise UnsupportedDicomError(path, f"file of {size} bytes exceeds the limit of {limits.max_file_bytes}",
                                        "file_too_large")
        data = path.read_bytes()
    elif len(data) > limits.max_file_bytes:
        raise UnsupportedDicomError(path, f"file of {len(data)} bytes exceeds the limit of {limits.max_file_bytes}",
                                    "file_too_large")
    try:  # from memory: a corrupt length never makes the reader allocate what the file claims
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types for corrupt input
        raise UnreadableImageError(path, f"not a readable DICOM file ({type(exc).__name__})") from exc
    if not any(keyword in ds for keyword in _CORE_KEYWORDS) and not _is_dicomdir(ds):
        if getattr(ds, "preamble", None) is None:
            reason = "not a DICOM file (no DICM header and no DICOM image elements)"
        else:
            reason = "DICOM header but no data elements could be read (truncated or corrupt file?)"
        raise UnreadableImageError(path, reason)
    parse_all_elements(ds, path)
    _ensure_transfer_syntax(ds)
    check_header_limits(ds, path, limits)
    check_supported(ds, path)
    return radiograph_from_dataset(ds, path, min_side=min_side, display=display, frame_decoder=frame_decoder)


@contextlib.contextmanager
def value_validation_off() -> Iterator[None]:
    """pydicom's value validation off (reading and writing) for the block, restored after.

    For processes that discard pydicom's warnings anyway (the edge daemon and its decode
    worker silence its logger and warnings): there, checking every value against its VR
    only cost time (about 0.5 ms per file on each side) and built messages quoting values.
    Validation never raises in pydicom's default mode, so nothing else changes; the checks
    this package relies on (the outputs' own VR checks) name their mode explicitly.
    """
    from pydicom import config

    before = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = before


def parse_all_elements(ds: Dataset, path: str | Path) -> None:
    """Convert every raw element (nested ones too); a malformed one raises ``malformed_element``.

    The message names the tag and the error type, never the value (values can be patient data).
    """
    tag = None
    try:
        for elem in ds.iterall():
            tag = elem.tag
    except Exception as exc:
        where = f"after {tag}" if tag is not None else "in the first element"
        raise UnsupportedDicomError(path, f"malformed data element {where} ({type(exc).__name__})",
                                    "malformed_element") from exc


def check_header_limits(ds: Dataset, path: str | Path, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Refuse from the header alone what would take more than ``limits`` to decode."""
    if "PixelData" not in ds:
        return
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames, samples = _int(ds, "NumberOfFrames", 1), _int(ds, "SamplesPerPixel", 1)
    bits = _int(ds, "BitsAllocated", 16)
    if rows <= 0 or columns <= 0:
        raise UnsupportedDicomError(path, "Rows/Columns missing or not positive", "invalid_dimensions")
    if rows * columns > limits.max_pixels:
        raise UnsupportedDicomError(path, f"{rows} x {columns} pixels per frame exceeds the limit of "
                                    f"{limits.max_pixels}", "too_many_pixels")
    if frames > limits.max_frames:
        raise UnsupportedDicomError(path, f"{frames} frames exceed the limit of {limits.max_frames}",
                                    "too_many_frames")
    decoded = rows * columns * max(frames, 1) * max(samples, 1) * max(1, (max(bits, 1) + 7) // 8)
    if decoded > limits.max_pixel_bytes:
        raise UnsupportedDicomError(path, f"{decoded} bytes of decoded pixel data exceed the limit of "
                                    f"{limits.max_pixel_bytes}", "pixel_data_too_large")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_encapsulated:
        size = codestream_size(ds.PixelData)
        if size is not None and (size[0] > rows or size[1] > columns):
            raise UnsupportedDicomError(path, f"compressed code stream is {size[0]} x {size[1]} pixels but the "
                                        f"header says {rows} x {columns}", "codestream_size_mismatch")


J2K_SOC_SIZ = b"\xff\x4f\xff\x51"  # a JPEG 2000 code stream opens with SOC, then the SIZ marker


def j2k_siz(stream: bytes, at: int = 0) -> tuple[int, int, int]:
    """``(rows, columns, components)`` stated by the SIZ marker whose SOC is at ``stream[at]`` (``Ysiz - YOsiz``,
    ``Xsiz - XOsiz``, ``Csiz``; components 0 when the stream ends before ``Csiz``)."""
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", stream[at + 8:at + 24])
    csiz = stream[at + 40:at + 42]
    return ysiz - yosiz, xsiz - xosiz, int.from_bytes(csiz, "big") if len(csiz) == 2 else 0


def codestream_size(pixel_data: bytes, scan: int = 1 << 16) -> tuple[int, int] | None:
    """``(rows, columns)`` from the first JPEG 2000 SIZ or JPEG/JPEG-LS SOF marker, if one is found."""
    head = bytes(pixel_data[:scan])
    at = head.find(J2K_SOC_SIZ)
    if at >= 0 and at + 24 <= len(head):
        rows, columns, _ = j2k_siz(head, at)
        return max(0, rows), max(0, columns)
    at = head.find(b"\xff\xd8")  # JPEG / JPEG-LS: walk the segments from SOI to the frame header
    if at < 0:
        return None
    pos = at + 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        length = struct.unpack(">H", head[pos + 2:pos + 4])[0]
        if marker in _SOF_MARKERS and pos + 9 <= len(head):
            rows, columns = struct.unpack(">HH", head[pos + 5:pos + 9])
            return rows, columns
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def check_supported(ds: Dataset, path: str | Path) -> None:
    """Raise :class:`UnsupportedDicomError` unless ``ds`` is a frontal, single-frame grayscale CR/DX image."""
    if _is_dicomdir(ds):
        raise UnsupportedDicomError(path, "DICOMDIR (media directory), not an image", "dicomdir")
    if "PixelData" not in ds:
        raise UnsupportedDicomError(path, "no Pixel Data (7FE0,0010)", "no_pixel_data")

    modality = _text(ds, "Modality")
    if modality and modality not in SUPPORTED_MODALITIES:
        raise UnsupportedDicomError(path, f"modality {modality} is not a radiograph (CR or DX)", "unsupported_modality")
    intent = _text(ds, "PresentationIntentType")
    sop_class = _text(ds, "SOPClassUID") or _media_storage_class(ds)
    if intent == "FOR PROCESSING" or sop_class == DX_FOR_PROCESSING_UID:
        raise UnsupportedDicomError(
            path, "image is FOR PROCESSING (raw detector data), not for presentation", "for_processing"
        )
    view = _text(ds, "ViewPosition")
    if view in LATERAL_VIEWS or "LAT" in view:
        raise UnsupportedDicomError(path, f"lateral view (ViewPosition {view})", "lateral_view")

    samples = _int(ds, "SamplesPerPixel", 1)
    photometric = _text(ds, "PhotometricInterpretation")
    if samples != 1 or photometric not in MONOCHROME:
        raise UnsupportedDicomError(
            path,
            f"not grayscale: SamplesPerPixel {samples}, PhotometricInterpretation {photometric or 'missing'}",
            "rgb",
        )
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise UnsupportedDicomError(path, f"multi-frame image ({frames} frames)", "multiframe")


def radiograph_from_dataset(ds: Dataset, path: str | Path, *, min_side: int = 0,
                            display: bool = False, frame_decoder: FrameDecoder | None = None) -> Radiograph:
    """Render ``ds`` (already checked) to float32 [0, 1] MONOCHROME2; see the module docstring.

    ``min_side > 0`` renders at ``1 / 2**level`` of the native size, the coarsest level whose
    short side stays ``>= min_side`` (see :mod:`lungseg.pixel_render`); ``native_shape`` and
    the pixel spacing still describe the source grid. ``display`` decodes at full size and keeps
    the presentation-ready image as 8 bits in ``Radiograph.display`` (see :func:`read_dicom`).
    """
    _ensure_transfer_syntax(ds)
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    decoder_name = "pydicom"
    if frame_decoder is not None:  # its own errors propagate: the caller decodes with the CPU decoders instead
        stored, level, decoder_name = frame_decoder.stored_values(ds), 0, frame_decoder.label
    else:
        try:
            stored, level = stored_values(ds, 0 if display else min_side)
        except Exception as exc:
            raise UnreadableImageError(
                path, f"cannot decode pixel data ({transfer_syntax.name}): {type(exc).__name__}: {exc}"
            ) from exc
    if stored.ndim != 2:
        raise UnreadableImageError(path, f"pixel data has shape {stored.shape}, expected one 2-D frame")
    native_shape = (int(ds.Rows), int(ds.Columns)) if level else (int(stored.shape[0]), int(stored.shape[1]))

    photometric = _text(ds, "PhotometricInterpretation")
    lut_shape = _text(ds, "PresentationLUTShape")
    invert = lut_shape == "INVERSE" if lut_shape in {"IDENTITY", "INVERSE"} else photometric == "MONOCHROME1"

    value_range: list[float] = []  # the modality values' range, when that range is the window (no usable VOI)

    def render(values: np.ndarray) -> tuple[np.ndarray, str]:
        try:
            values = np.asarray(apply_modality_lut(values, ds))
        except Exception as exc:
            raise UnreadableImageError(path, f"invalid modality LUT/rescale: {type(exc).__name__}: {exc}") from exc
        values, voi = _apply_voi(values, ds, path)
        if voi.startswith("minmax") and values.size:
            value_range[:] = [float(values.min()), float(values.max())]
        return to_unit_range(-values if invert else values), voi

    rendered = render_with_lut(stored, render)
    pixels, voi = rendered if rendered is not None else render(stored)
    if not np.all(np.isfinite(pixels)):
        raise UnreadableImageError(path, "rendering produced non-finite values")
    shown = to_gray8(pixels) if display else None
    if level == 0 and min_side > 0:
        level = reduction_level(native_shape[0], native_shape[1], min_side)
        pixels = block_means(pixels, level)

    spacing, spacing_source, magnification = _pixel_spacing(ds)
    facts: dict[str, Any] = {
        "format": "dicom",
        "modality": _text(ds, "Modality") or None,
        "photometric_interpretation": photometric or None,
        "presentation_lut_shape": lut_shape or None,
        "inverted": invert,
        "voi": voi,
        "minmax_window": tuple(value_range) if voi.startswith("minmax") and value_range else None,
        "bits_stored": _int(ds, "BitsStored", 0) or None,
        "transfer_syntax_uid": str(transfer_syntax),
        "sop_instance_uid": _text(ds, "SOPInstanceUID") or None,
        "study_instance_uid": _text(ds, "StudyInstanceUID") or None,
        "series_instance_uid": _text(ds, "SeriesInstanceUID") or None,
        "rows": native_shape[0],
        "columns": native_shape[1],
        "decoded_level": level,
        "pixel_decoder": decoder_name,
        "spacing_source": spacing_source,
        "magnification_factor": magnification,
        "view_position": _text(ds, "ViewPosition") or None,
        "patient_orientation": _orientation(ds),
    }
    return Radiograph(pixels=pixels, source=str(path), pixel_spacing_mm=spacing, dataset=ds, facts=facts,
                      native_shape=native_shape, display=shown)


def _media_storage_class(ds: Dataset) -> str:
    file_meta = getattr(ds, "file_meta", None)
    return str(file_meta.get("MediaStorageSOPClassUID", "")) if file_meta is not None else ""


def _is_dicomdir(ds: Dataset) -> bool:
    return _media_storage_class(ds) == MEDIA_STORAGE_DIRECTORY_UID or "DirectoryRecordSequence" in ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a data set without (0002,0010) the transfer syntax it was actually read with."""
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None:
        file_meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in file_meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is False:
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
    else:
        file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def _apply_voi(values: np.ndarray, ds: Dataset, path: str | Path) -> tuple[np.ndarray, str]:
    """Apply the VOI LUT or first window; return the values and which VOI was used."""
    if ds.get("VOILUTSequence"):
        kind = "voi_lut"
        if values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
            values = values.astype(np.int64)  # LUT entries are indexed by integer values
    elif _has_value(ds, "WindowCenter") and _has_value(ds, "WindowWidth"):
        kind = "window"
    else:
        return values.astype(np.float64), "minmax"
    try:
        out = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float64)
    except Exception as exc:
        logger.warning("%s: ignoring invalid %s (%s); using min/max", Path(path).name, kind, exc)
        return values.astype(np.float64), "minmax_fallback"
    if np.ptp(out) == 0 and np.ptp(values) > 0:
        logger.warning(
            "%s: %s maps every pixel to one value (data %.6g..%.6g); using min/max",
            Path(path).name,  # the file name only: folder names can carry patient names
            kind,
            float(values.min()),
            float(values.max()),
        )
        return values.astype(np.float64), "minmax_fallback"
    return out, kind


def _pixel_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None, float | None]:
    """Return ``(spacing, source, magnification)``: PixelSpacing, else ImagerPixelSpacing / ERMF."""
    magnification = _positive(ds.get("EstimatedRadiographicMagnificationFactor"))
    spacing = _positive_pair(ds.get("PixelSpacing"))
    if spacing is not None:
        return spacing, "PixelSpacing", magnification
    spacing = _positive_pair(ds.get("ImagerPixelSpacing"))
    if spacing is None:
        return None, None, magnification
    if magnification is None:
        return spacing, "ImagerPixelSpacing", None
    corrected = (spacing[0] / magnification, spacing[1] / magnification)
    return corrected, "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor", magnification


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _positive_pair(value: Any) -> tuple[float, float] | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        items = list(value)
    except TypeError:
        return None
    if len(items) != 2:
        return None
    row, column = _positive(items[0]), _positive(items[1])
    return (row, column) if row is not None and column is not None else None


def _has_value(ds: Dataset, keyword: str) -> bool:
    return keyword in ds and ds[keyword].value not in (None, "", b"")


def _text(ds: Dataset, keyword: str) -> str:
    """The element's value as stripped upper-case text ('' when absent or empty)."""
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    return "" if value is None else str(value).strip().upper()


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except Exception:
        return default


def _orientation(ds: Dataset) -> list[str] | None:
    value = ds.get("PatientOrientation")
    if not value:
        return None
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value]
