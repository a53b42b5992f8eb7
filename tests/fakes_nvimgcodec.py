"""A stand-in for ``nvidia.nvimgcodec`` (nvImageCodec >= 0.6) that decodes with OpenJPEG on the CPU.

As strict as the documented API where lungseg touches it:

* ``DecodeParams`` takes keyword arguments only, with the real defaults: ``apply_exif_orientation=True``,
  ``allow_any_depth=False`` (samples above 8 bits are scaled down to uint8) and ``color_spec=ColorSpec.SRGB``
  (a grayscale image comes back with 3 channels): code that forgets ``allow_any_depth=True`` or
  ``ColorSpec.UNCHANGED`` gets different pixels, as it would from the real decoder.
* ``Decoder.decode`` returns an ``Image`` in device memory, or ``None`` when the stream cannot be decoded.
  A device image has ``__cuda_array_interface__`` only: ``numpy.asarray`` on it fails, as on the real one;
  ``Image.cpu()`` gives the host image numpy can read. Images are (H, W, C).

Not modelled (not known from NVIDIA's documentation): the exact error texts, and which malformed streams the
real decoder rejects rather than decodes partially; the code under test never relies on either.
``fail`` makes every decode raise ``RuntimeError`` (a CUDA error); ``decodes`` counts decode calls.
"""

from __future__ import annotations

import enum
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np


class ColorSpec(enum.Enum):
    UNCHANGED = 0
    SRGB = 1
    GRAY = 2
    SYCC = 3


class DecodeParams:
    def __init__(self, *, apply_exif_orientation: bool = True, allow_any_depth: bool = False,
                 color_spec: ColorSpec = ColorSpec.SRGB):
        if not isinstance(color_spec, ColorSpec):
            raise TypeError(f"color_spec must be a ColorSpec, not {type(color_spec).__name__}")
        self.apply_exif_orientation = apply_exif_orientation
        self.allow_any_depth = allow_any_depth
        self.color_spec = color_spec


class Image:
    def __init__(self, array: np.ndarray, on_device: bool, precision: int):
        self._array = array
        self._on_device = on_device
        self.precision = precision

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    @property
    def buffer_kind(self) -> str:
        return "STRIDED_DEVICE" if self._on_device else "STRIDED_HOST"

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        if not self._on_device:
            raise AttributeError("a host image has no __cuda_array_interface__")
        return {"shape": self.shape, "typestr": self._array.dtype.str, "data": (0, True), "version": 3}

    @property
    def __array_interface__(self) -> dict[str, Any]:
        if self._on_device:  # the real device Image exposes no host buffer
            raise AttributeError("device image: call .cpu() first")
        return self._array.__array_interface__

    def cpu(self) -> Image:
        return Image(self._array.copy(), False, self.precision)

    def cuda(self) -> Image:
        return Image(self._array, True, self.precision)


@dataclass
class FakeState:
    fail: bool = False
    decodes: int = 0


def _openjpeg(data: bytes) -> np.ndarray | None:
    import glymur

    with tempfile.NamedTemporaryFile(suffix=".j2k") as handle:
        handle.write(data)
        handle.flush()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return np.asarray(glymur.Jp2k(handle.name)[:])
        except Exception:
            return None


def make_module(state: FakeState) -> types.ModuleType:
    module = types.ModuleType("nvidia.nvimgcodec")
    module.__version__ = "0.6.1"  # type: ignore[attr-defined]

    class Decoder:
        def __init__(self, device_id: int = -1, max_num_cpu_threads: int = 0, backends: Any = None,
                     options: str = ""):
            self.device_id = device_id

        def decode(self, src: Any, params: DecodeParams | None = None) -> Image | None:
            if not isinstance(src, (bytes, bytearray, memoryview, np.ndarray)):
                raise TypeError(f"decode() takes encoded bytes or a CodeStream, not {type(src).__name__}")
            params = params or DecodeParams()
            if not isinstance(params, DecodeParams):
                raise TypeError("params must be a DecodeParams")
            state.decodes += 1
            if state.fail:
                raise RuntimeError("nvImageCodec: CUDA error 700 (an illegal memory access was encountered)")
            array = _openjpeg(bytes(src))
            if array is None:
                return None
            if array.ndim == 2:
                array = array[:, :, None]
            precision = 8 * array.dtype.itemsize
            if not params.allow_any_depth and array.dtype != np.uint8:
                array = (array.astype(np.float64) * 255.0 / float(np.iinfo(array.dtype).max)).round().astype(np.uint8)
            if params.color_spec == ColorSpec.SRGB and array.shape[2] == 1:
                array = np.repeat(array, 3, axis=2)
            return Image(np.ascontiguousarray(array), True, precision)

    module.Decoder = Decoder  # type: ignore[attr-defined]
    module.DecodeParams = DecodeParams  # type: ignore[attr-defined]
    module.ColorSpec = ColorSpec  # type: ignore[attr-defined]
    module.Image = Image  # type: ignore[attr-defined]
    module.state = state  # type: ignore[attr-defined]
    return module


def install(monkeypatch: Any, state: FakeState | None = None) -> FakeState:
    """Put the fake in ``sys.modules`` as ``nvidia.nvimgcodec`` (``nvidia`` a namespace package)."""
    state = state or FakeState()
    nvidia = types.ModuleType("nvidia")
    nvidia.__path__ = []  # type: ignore[attr-defined]
    module = make_module(state)
    nvidia.nvimgcodec = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", module)
    return state
