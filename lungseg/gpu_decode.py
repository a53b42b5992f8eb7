"""JPEG 2000 / HTJ2K frames decoded on the GPU with nvImageCodec (optional, off by default).

nvImageCodec (``from nvidia import nvimgcodec``; wheels ``nvidia-nvimgcodec-cu12`` / ``-cu13`` / ``-tegra-cu12``
with their ``[nvjpeg2k]`` extra for JPEG 2000) decodes the frame at full resolution for the overlay; the model's
reduced resolution is then the same area reduction the CPU path uses for a full-size decode. The GPU decoder
runs in the service process (a CUDA context cannot live under the CPU decode worker's address-space limit), so
it has its own limits, checked before any byte reaches it: one grayscale frame, a code stream no larger than
``max_frame_bytes`` whose SIZ marker states exactly the header's Rows x Columns, and no more than ``max_pixels``.
Whatever it returns is checked again (shape, sample type). Any refusal or error raises :class:`GpuDecodeError`
and the caller decodes the file with the CPU decoder in its isolated worker instead.

API used (nvImageCodec >= 0.6): ``Decoder()``, ``Decoder.decode(data, params=DecodeParams(...))`` (an
``Image`` or ``None``), ``DecodeParams(apply_exif_orientation=False, allow_any_depth=True,
color_spec=ColorSpec.UNCHANGED)``, ``Image.cpu()``, and numpy's ``__array_interface__`` on a host image.
Not yet run on a GPU by this project: ``gpu_decode`` stays off by default until it is.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from lungseg.dicom_decode import J2K_SOC_SIZ, j2k_siz
from lungseg.errors import LungsegError
from lungseg.pixel_render import J2K_SYNTAXES, apply_pixel_representation, first_frame

log = logging.getLogger(__name__)

MODULE = "nvidia.nvimgcodec"
INSTALL_HINT = ("pip install 'nvidia-nvimgcodec-cu12[nvjpeg2k]' (x86-64, CUDA 12; "
                "'nvidia-nvimgcodec-tegra-cu12[nvjpeg2k]' on Jetson)")
J2K_SYNTAX_BYTES = tuple(uid.encode() for uid in J2K_SYNTAXES)


class GpuDecodeError(LungsegError, RuntimeError):
    """The GPU decoder refused or failed this frame: decode it with the CPU decoder instead."""


def looks_like_j2k(data: bytes, scan: int = 4096) -> bool:
    """Cheap pre-filter on a file's first bytes (its file meta): does it name a JPEG 2000 transfer syntax?"""
    head = bytes(data[:scan])
    return any(uid in head for uid in J2K_SYNTAX_BYTES)


def codestream_dimensions(frame: bytes) -> tuple[int, int, int]:
    """``(rows, columns, components)`` from the code stream's SIZ marker, which must open it (SOC, SIZ)."""
    if len(frame) < 42 or frame[:4] != J2K_SOC_SIZ:
        raise GpuDecodeError("the frame does not start with a JPEG 2000 SOC + SIZ marker")
    return j2k_siz(frame)


def load_module() -> tuple[Any, str | None]:
    """``(nvimgcodec module or None, why not)``."""
    try:
        module = importlib.import_module(MODULE)
    except ImportError as exc:
        return None, f"nvImageCodec is not installed ({exc}); {INSTALL_HINT}"
    except Exception as exc:  # a broken CUDA install can fail at import
        return None, f"nvImageCodec failed to load: {type(exc).__name__}: {exc}"
    return module, None


class GpuFrameDecoder:
    """Decodes one DICOM data set's JPEG 2000 frame on the GPU (see the module docstring)."""

    def __init__(self, module: Any, *, max_pixels: int, max_frame_bytes: int):
        self._codec = module
        self.max_pixels = int(max_pixels)
        self.max_frame_bytes = int(max_frame_bytes)
        self.version = str(getattr(module, "__version__", "?"))
        self.label = f"nvimgcodec {self.version}"
        self._decoder = module.Decoder()
        self._params = module.DecodeParams(apply_exif_orientation=False, allow_any_depth=True,
                                           color_spec=module.ColorSpec.UNCHANGED)

    @classmethod
    def create(cls, *, max_pixels: int, max_frame_bytes: int) -> tuple[GpuFrameDecoder | None, str | None]:
        """A decoder, or ``(None, reason)`` when nvImageCodec or its GPU cannot be used here."""
        module, reason = load_module()
        if module is None:
            return None, reason
        try:
            return cls(module, max_pixels=max_pixels, max_frame_bytes=max_frame_bytes), None
        except Exception as exc:  # no GPU, no driver, missing nvJPEG2000 ...
            return None, f"nvImageCodec decoder could not start: {type(exc).__name__}: {exc}"

    def check(self, ds: Dataset) -> bytes:
        """The frame to decode, after every limit; :class:`GpuDecodeError` for anything this decoder does not take."""
        syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        if syntax not in J2K_SYNTAXES:
            raise GpuDecodeError(f"transfer syntax {syntax or '(none)'} is not JPEG 2000")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise GpuDecodeError("only single-frame grayscale images are decoded on the GPU")
        if int(ds.get("BitsAllocated", 16) or 16) not in (8, 16):
            raise GpuDecodeError(f"BitsAllocated {ds.get('BitsAllocated')} is not 8 or 16")
        rows, columns = int(ds.Rows), int(ds.Columns)
        if rows * columns > self.max_pixels:
            raise GpuDecodeError(f"{rows}x{columns} exceeds the limit of {self.max_pixels} pixels")
        try:
            frame = first_frame(ds)
        except Exception as exc:  # malformed encapsulation: pydicom's errors, for the CPU decoder to judge
            raise GpuDecodeError(f"no frame could be read: {type(exc).__name__}: {exc}") from exc
        if len(frame) > self.max_frame_bytes:
            raise GpuDecodeError(f"code stream of {len(frame)} bytes exceeds {self.max_frame_bytes}")
        stated = codestream_dimensions(frame)
        if stated != (rows, columns, 1):
            raise GpuDecodeError(f"code stream states {stated[0]}x{stated[1]}x{stated[2]}, "
                                 f"the header {rows}x{columns}x1")
        return frame

    def stored_values(self, ds: Dataset) -> np.ndarray:
        """The frame's stored values at full resolution, typed as pydicom's decoder would type them."""
        frame = self.check(ds)
        try:
            image = self._decoder.decode(frame, params=self._params)
            if image is None:
                raise GpuDecodeError("nvImageCodec could not decode the frame")
            array = np.asarray(image.cpu())
        except GpuDecodeError:
            raise
        except Exception as exc:  # CUDA or codec errors: the CPU decoder takes the file
            raise GpuDecodeError(f"nvImageCodec failed: {type(exc).__name__}: {exc}") from exc
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        rows, columns = int(ds.Rows), int(ds.Columns)
        if array.shape != (rows, columns):
            raise GpuDecodeError(f"nvImageCodec returned {array.shape}, expected ({rows}, {columns})")
        if array.dtype not in (np.uint8, np.uint16, np.int16):
            raise GpuDecodeError(f"nvImageCodec returned {array.dtype} samples")
        return apply_pixel_representation(np.ascontiguousarray(array), ds)


__all__ = ["GpuDecodeError", "GpuFrameDecoder", "codestream_dimensions", "load_module", "looks_like_j2k"]
