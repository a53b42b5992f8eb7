"""CUDA device identity, streams, device buffers and pinned host buffers through cuda-python.

Used by the TensorRT runtime (and exercised alone by ``python -m
lungseg.benchmarks.gpu_selfcheck``). cuda-python's runtime module is
``cuda.bindings.runtime`` (cuda-python >= 12.6) or ``cuda.cudart`` (older); every
call returns a tuple whose first item is a ``cudaError_t``. :func:`check` turns a
non-success code into :class:`CudaError`, which names the call and the error, so a
failing GPU becomes an exception the predictor chain can demote on.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

JETSON_MODEL_FILE = Path("/proc/device-tree/model")


class CudaUnavailableError(RuntimeError):
    """cuda-python is missing or no CUDA device is visible; the message says which."""


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error code."""

    def __init__(self, call: str, code: Any, text: str = ""):
        self.call, self.code = call, code
        super().__init__(f"{call} failed: {_code_name(code)}{f' ({text})' if text else ''}")


def _code_name(code: Any) -> str:
    return str(getattr(code, "name", code))


def import_cudart() -> ModuleType:
    """cuda-python's runtime module, or :class:`CudaUnavailableError`."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError as exc:
            raise CudaUnavailableError(
                "cuda-python is not installed (pip install 'cuda-python>=12.2,<13'; see packaging/INSTALL.md)"
            ) from exc
    return runtime


def check(cudart: ModuleType, call: str, result: Any) -> Any:
    """The value of a cuda-python call's ``(err, value...)`` tuple, or :class:`CudaError`."""
    if not isinstance(result, tuple) or not result:
        raise CudaError(call, result, "unexpected return value")
    code = result[0]
    if code != cudart.cudaError_t.cudaSuccess:
        text = ""
        try:
            described = cudart.cudaGetErrorString(code)
            text = described[1] if isinstance(described, tuple) and len(described) > 1 else described
            text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
        except Exception:  # describing the error must not hide it
            text = ""
        raise CudaError(call, code, text)
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


@dataclass(frozen=True)
class DeviceIdentity:
    """What an engine is bound to: an engine runs only where all of this is equal."""

    name: str
    compute_capability: str
    sm_count: int
    total_memory_mb: int
    board: str = ""  # /proc/device-tree/model on Jetson (AGX Orin vs Orin NX vs Orin Nano)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _board_model(path: Path = JETSON_MODEL_FILE) -> str:
    try:
        return path.read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
    except OSError:
        return ""


def device_identity(device: int = 0) -> DeviceIdentity:
    """Identity of CUDA ``device``; :class:`CudaUnavailableError` when there is none."""
    cudart = import_cudart()
    try:
        count = check(cudart, "cudaGetDeviceCount", cudart.cudaGetDeviceCount())
    except CudaError as exc:
        raise CudaUnavailableError(f"no CUDA device visible ({exc})") from exc
    if not count or count <= device:
        raise CudaUnavailableError(f"no CUDA device {device} visible ({count or 0} device(s))")
    props = check(cudart, "cudaGetDeviceProperties", cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceIdentity(
        name=name.rstrip("\x00").strip(), compute_capability=f"{props.major}.{props.minor}",
        sm_count=int(props.multiProcessorCount), total_memory_mb=int(props.totalGlobalMem) >> 20,
        board=_board_model(),
    )


class Stream:
    """A CUDA stream, destroyed by :meth:`close` (idempotent)."""

    def __init__(self, cudart: ModuleType):
        self._rt = cudart
        self._stream = check(cudart, "cudaStreamCreate", cudart.cudaStreamCreate())

    @property
    def handle(self) -> int:
        if self._stream is None:
            raise CudaError("stream", "destroyed", "the stream was already destroyed")
        return int(self._stream)

    @property
    def raw(self) -> Any:
        return self._stream

    def synchronize(self) -> None:
        check(self._rt, "cudaStreamSynchronize", self._rt.cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            check(self._rt, "cudaStreamDestroy", self._rt.cudaStreamDestroy(stream))


class DeviceBuffer:
    """``nbytes`` of device memory (``cudaMalloc``), freed by :meth:`close`."""

    def __init__(self, cudart: ModuleType, nbytes: int):
        if nbytes <= 0:
            raise ValueError(f"device buffer size must be positive, got {nbytes}")
        self._rt, self.nbytes = cudart, int(nbytes)
        self.ptr: int | None = int(check(cudart, "cudaMalloc", cudart.cudaMalloc(self.nbytes)))

    def close(self) -> None:
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            check(self._rt, "cudaFree", self._rt.cudaFree(ptr))


class PinnedBuffer:
    """Page-locked host memory (``cudaMallocHost``) seen as a float32 numpy array; freed by :meth:`close`."""

    def __init__(self, cudart: ModuleType, nbytes: int):
        if nbytes <= 0 or nbytes % 4:
            raise ValueError(f"pinned buffer size must be a positive multiple of 4, got {nbytes}")
        self._rt, self.nbytes = cudart, int(nbytes)
        self.ptr: int | None = int(check(cudart, "cudaMallocHost", cudart.cudaMallocHost(self.nbytes)))
        self.array = np.ctypeslib.as_array((ctypes.c_float * (self.nbytes // 4)).from_address(self.ptr))

    def close(self) -> None:
        ptr, self.ptr = self.ptr, None
        self.array = np.empty(0, dtype=np.float32)
        if ptr is not None:
            check(self._rt, "cudaFreeHost", self._rt.cudaFreeHost(ptr))


class IOBuffers:
    """One device buffer and one pinned host buffer per tensor, and the stream they are copied on."""

    def __init__(self, sizes: Mapping[str, int], cudart: ModuleType | None = None):
        self._rt = cudart or import_cudart()
        self.sizes = dict(sizes)
        self.device: dict[str, DeviceBuffer] = {}
        self.host: dict[str, PinnedBuffer] = {}
        self.stream: Stream | None = None
        try:
            self.stream = Stream(self._rt)
            for name, nbytes in self.sizes.items():
                self.device[name] = DeviceBuffer(self._rt, nbytes)
                self.host[name] = PinnedBuffer(self._rt, nbytes)
        except BaseException:
            self.close()
            raise

    def address(self, name: str) -> int:
        ptr = self.device[name].ptr
        if ptr is None:
            raise CudaError("address", "freed", f"{name} buffer was freed")
        return ptr

    def stage(self, name: str, array: np.ndarray) -> None:
        """Copy ``array`` into ``name``'s pinned host buffer (checks it fits)."""
        flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
        host = self.host[name].array
        if flat.size > host.size:
            raise ValueError(f"{name}: {flat.nbytes} bytes do not fit the {self.sizes[name]}-byte buffer")
        host[: flat.size] = flat

    def upload(self, name: str, nbytes: int) -> None:
        """Asynchronous copy of the first ``nbytes`` of ``name`` host -> device."""
        self._copy(name, nbytes, to_device=True)

    def download(self, name: str, nbytes: int) -> None:
        """Asynchronous copy of the first ``nbytes`` of ``name`` device -> host."""
        self._copy(name, nbytes, to_device=False)

    def _copy(self, name: str, nbytes: int, *, to_device: bool) -> None:
        if not 0 < nbytes <= self.sizes[name]:
            raise ValueError(f"{name}: copy of {nbytes} bytes outside the {self.sizes[name]}-byte buffer")
        assert self.stream is not None
        kinds = self._rt.cudaMemcpyKind
        host, device = self.host[name].ptr, self.address(name)
        dst, src, kind = ((device, host, kinds.cudaMemcpyHostToDevice) if to_device
                          else (host, device, kinds.cudaMemcpyDeviceToHost))
        check(self._rt, "cudaMemcpyAsync", self._rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream.raw))

    def result(self, name: str, count: int) -> np.ndarray:
        """A copy of the first ``count`` floats of ``name``'s host buffer (call after :meth:`synchronize`)."""
        return self.host[name].array[:count].copy()

    def synchronize(self) -> None:
        assert self.stream is not None
        self.stream.synchronize()

    def close(self) -> None:
        """Free every buffer and destroy the stream; errors are logged (the GPU may be gone)."""
        items: list[Any] = [*self.device.values(), *self.host.values()]
        if self.stream is not None:
            items.append(self.stream)
        for item in items:
            try:
                item.close()
            except CudaError as exc:
                log.warning("releasing CUDA memory: %s", exc)
        self.device, self.host, self.stream = {}, {}, None


__all__ = ["CudaError", "CudaUnavailableError", "DeviceBuffer", "DeviceIdentity", "IOBuffers", "PinnedBuffer",
           "Stream", "check", "device_identity", "import_cudart"]
