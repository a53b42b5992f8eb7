# ruff: noqa: N815 (cuda-python spells its enum members in camelCase)
"""An in-process stand-in for cuda-python's runtime module that enforces the contracts lungseg relies on.

Like ``cuda.bindings.runtime`` every call returns a tuple whose first item is a
``cudaError_t``. Device memory is host bytes behind opaque integer addresses;
copies are checked against allocation bounds, freed pointers and live streams;
host copies record whether the host side was pinned (``cudaMallocHost``).
Asynchronous work (copies, inference, graph launches) is queued per stream and runs
at ``cudaStreamSynchronize``, so a missing synchronize leaves a result unread, and
an error in queued work is reported by the synchronize, as CUDA does.
``fail(call, error, after=n)`` makes the n-th later call of ``call`` return
``error`` (and every call after it: a GPU that fell off the bus stays gone).
Install with :func:`install` (a pytest ``monkeypatch`` puts it in ``sys.modules``) in the module layout of
one cuda-python release line (``layout``):

* ``"12.6+"`` (default; what ``cuda-python>=12.2,<13`` resolves to today, 12.9.x): ``cuda.bindings.runtime``
  is the module, ``cuda.cudart`` a separate, deprecated module that forwards to it;
* ``"bindings"``: ``cuda.bindings.runtime`` alone (the ``cuda-bindings`` wheel without the old names);
* ``"12.2-12.5"``: ``cuda.cudart`` alone (no ``cuda.bindings`` package).

Each name is its own module object, so a test sees which one the code imported. Both names expose the same
functions, enums and tuple returns in every release below 13 (cuda-python 12.6 moved the implementation to
``cuda.bindings`` and kept ``cuda.cudart`` as a forwarding shim; 13.0 dropped the shim), so one
:class:`FakeCudaRuntime` serves both. What 13.x changed beyond the shim is not modelled: the extra pins ``<13``.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700
    cudaErrorLaunchFailure = 719
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class cudaStream_t:  # noqa: N801
    def __init__(self, handle: int):
        self._handle = handle

    def __int__(self) -> int:
        return self._handle

    def getPtr(self) -> int:  # noqa: N802
        return self._handle


@dataclass
class Props:
    name: bytes = b"NVIDIA Jetson AGX Orin"
    major: int = 8
    minor: int = 7
    multiProcessorCount: int = 16
    totalGlobalMem: int = 64 * 1024**3


@dataclass
class FakeCudaRuntime:
    """State of the fake GPU; the module-level functions are its bound methods."""

    props: list[Props] = field(default_factory=lambda: [Props()])
    memory_limit: int = 8 * 1024**3
    host_limit: int = 4 * 1024**3  # page-locked host memory the fake "system" grants
    device: dict[int, bytearray] = field(default_factory=dict)
    pinned: dict[int, Any] = field(default_factory=dict)
    live_streams: set[int] = field(default_factory=set)
    created_streams: int = 0
    pageable_copies: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    failures: dict[str, tuple[cudaError_t, int]] = field(default_factory=dict)
    invalidated: set[int] = field(default_factory=set)  # streams whose capture a forbidden call broke
    pending: dict[int, list[Any]] = field(default_factory=dict)  # queued asynchronous work per stream
    capturing: dict[int, list[Callable[[], cudaError_t]]] = field(default_factory=dict)
    graphs: dict[int, list[Callable[[], cudaError_t]]] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(0x7000_0000_0000, 0x1000_0000))

    # --- failure injection --------------------------------------------------
    def fail(self, call: str, error: cudaError_t = cudaError_t.cudaErrorLaunchFailure, after: int = 0) -> None:
        self.failures[call] = (error, self.calls.get(call, 0) + after)

    def _enter(self, call: str) -> cudaError_t | None:
        self.calls[call] = self.calls.get(call, 0) + 1
        if call in self.failures:
            error, threshold = self.failures[call]
            if self.calls[call] > threshold:
                return error
        return None

    # --- devices --------------------------------------------------------------
    def cudaGetDeviceCount(self) -> tuple:  # noqa: N802
        err = self._enter("cudaGetDeviceCount")
        if err or not self.props:
            return (err or cudaError_t.cudaErrorNoDevice, 0)
        return (cudaError_t.cudaSuccess, len(self.props))

    def cudaGetDeviceProperties(self, device: int) -> tuple:  # noqa: N802
        if not 0 <= device < len(self.props):
            return (cudaError_t.cudaErrorInvalidValue, None)
        return (cudaError_t.cudaSuccess, self.props[device])

    def cudaGetErrorString(self, error: cudaError_t) -> tuple:  # noqa: N802
        return (cudaError_t.cudaSuccess, f"fake {cudaError_t(error).name}".encode())

    # --- memory ---------------------------------------------------------------
    def _used(self) -> int:
        return sum(len(b) for b in self.device.values())

    def cudaMalloc(self, nbytes: int) -> tuple:  # noqa: N802
        err = self._enter("cudaMalloc")
        if err:
            return (err, 0)
        if nbytes <= 0 or self._used() + nbytes > self.memory_limit:
            return (cudaError_t.cudaErrorMemoryAllocation, 0)
        ptr = next(self._ids)
        self.device[ptr] = bytearray(nbytes)
        return (cudaError_t.cudaSuccess, ptr)

    def cudaFree(self, ptr: int) -> tuple:  # noqa: N802
        if ptr not in self.device:
            return (cudaError_t.cudaErrorInvalidValue,)
        del self.device[ptr]
        return (cudaError_t.cudaSuccess,)

    def cudaMallocHost(self, nbytes: int) -> tuple:  # noqa: N802
        err = self._enter("cudaMallocHost")
        if err:
            return (err, 0)
        if nbytes <= 0 or sum(ctypes.sizeof(b) for b in self.pinned.values()) + nbytes > self.host_limit:
            return (cudaError_t.cudaErrorMemoryAllocation, 0)
        buffer = (ctypes.c_char * nbytes)()
        ptr = ctypes.addressof(buffer)
        self.pinned[ptr] = buffer
        return (cudaError_t.cudaSuccess, ptr)

    def cudaFreeHost(self, ptr: int) -> tuple:  # noqa: N802
        if ptr not in self.pinned:
            return (cudaError_t.cudaErrorInvalidValue,)
        del self.pinned[ptr]
        return (cudaError_t.cudaSuccess,)

    def _device_span(self, ptr: int, nbytes: int) -> tuple[bytearray, int] | None:
        for base, data in self.device.items():
            if base <= ptr and ptr + nbytes <= base + len(data):
                return data, ptr - base
        return None

    def _is_pinned(self, ptr: int, nbytes: int) -> bool:
        return any(base <= ptr and ptr + nbytes <= base + ctypes.sizeof(buf) for base, buf in self.pinned.items())

    def _stream_ok(self, stream: Any) -> bool:
        return int(stream) in self.live_streams

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: cudaMemcpyKind, stream: Any) -> tuple:  # noqa: N802
        err = self._enter("cudaMemcpyAsync")
        if err:
            return (err,)
        if not self._stream_ok(stream):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            span, host = self._device_span(dst, nbytes), src
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            span, host = self._device_span(src, nbytes), dst
        else:
            return (cudaError_t.cudaErrorInvalidValue,)
        if span is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        if not self._is_pinned(host, nbytes):
            self.pageable_copies += 1
        data, offset = span

        def copy() -> cudaError_t:
            if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
                data[offset:offset + nbytes] = ctypes.string_at(host, nbytes)
            else:
                ctypes.memmove(host, (ctypes.c_char * nbytes).from_buffer(data, offset), nbytes)
            return cudaError_t.cudaSuccess

        return (self.enqueue(stream, copy),)

    def read_device(self, ptr: int, nbytes: int) -> bytes:
        span = self._device_span(ptr, nbytes)
        if span is None:
            raise ValueError(f"fake CUDA: {nbytes} bytes at {ptr:#x} are not allocated device memory")
        data, offset = span
        return bytes(data[offset:offset + nbytes])

    def write_device(self, ptr: int, payload: bytes) -> None:
        span = self._device_span(ptr, len(payload))
        if span is None:
            raise ValueError(f"fake CUDA: {len(payload)} bytes at {ptr:#x} are not allocated device memory")
        data, offset = span
        data[offset:offset + len(payload)] = payload

    # --- streams and graphs ---------------------------------------------------------
    def enqueue(self, stream: Any, op: Callable[[], cudaError_t]) -> cudaError_t:
        """Queue ``op`` on ``stream`` (it runs at the stream's next synchronize, as asynchronous work does: a
        result read before ``cudaStreamSynchronize`` is not there yet), or record it when the stream is capturing."""
        if int(stream) in self.capturing:
            self.capturing[int(stream)].append(op)
            return cudaError_t.cudaSuccess
        self.pending.setdefault(int(stream), []).append(op)
        return cudaError_t.cudaSuccess

    def _drain(self, stream: int) -> cudaError_t:
        """Run the stream's queued work in order; the first error is the one a synchronize reports."""
        error = cudaError_t.cudaSuccess
        for op in self.pending.pop(stream, []):
            result = op()
            if result != cudaError_t.cudaSuccess and error == cudaError_t.cudaSuccess:
                error = result
        return error

    def cudaStreamCreate(self) -> tuple:  # noqa: N802
        err = self._enter("cudaStreamCreate")
        if err:
            return (err, None)
        handle = next(self._ids)
        self.live_streams.add(handle)
        self.created_streams += 1
        return (cudaError_t.cudaSuccess, cudaStream_t(handle))

    def cudaStreamDestroy(self, stream: Any) -> tuple:  # noqa: N802
        if int(stream) not in self.live_streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self._drain(int(stream))  # queued work still completes, as CUDA finishes it after a destroy
        self.live_streams.discard(int(stream))
        return (cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple:  # noqa: N802
        err = self._enter("cudaStreamSynchronize")
        if err:
            return (err,)
        if not self._stream_ok(stream):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if int(stream) in self.capturing:  # illegal while capturing: the capture is invalidated, as CUDA does
            self.invalidated.add(int(stream))
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        return (self._drain(int(stream)),)

    def cudaStreamBeginCapture(self, stream: Any, mode: cudaStreamCaptureMode) -> tuple:  # noqa: N802
        err = self._enter("cudaStreamBeginCapture")
        if err:
            return (err,)
        if not self._stream_ok(stream) or int(stream) in self.capturing:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.capturing[int(stream)] = []
        return (cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple:  # noqa: N802
        ops = self.capturing.pop(int(stream), None)
        if ops is None:
            return (cudaError_t.cudaErrorInvalidValue, None)
        if int(stream) in self.invalidated:
            self.invalidated.discard(int(stream))
            return (cudaError_t.cudaErrorStreamCaptureInvalidated, None)
        handle = next(self._ids)
        self.graphs[handle] = ops
        return (cudaError_t.cudaSuccess, handle)

    def cudaGraphInstantiate(self, graph: int, flags: int = 0) -> tuple:  # noqa: N802
        if graph not in self.graphs:
            return (cudaError_t.cudaErrorInvalidValue, None)
        handle = next(self._ids)
        self.graphs[handle] = self.graphs[graph]
        return (cudaError_t.cudaSuccess, handle)

    def cudaGraphLaunch(self, graph_exec: int, stream: Any) -> tuple:  # noqa: N802
        err = self._enter("cudaGraphLaunch")
        if err:
            return (err,)
        if graph_exec not in self.graphs or not self._stream_ok(stream):
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self.calls["graph_replays"] = self.calls.get("graph_replays", 0) + 1
        self.pending.setdefault(int(stream), []).extend(self.graphs[graph_exec])  # asynchronous, like the rest
        return (cudaError_t.cudaSuccess,)

    def cudaGraphDestroy(self, graph: int) -> tuple:  # noqa: N802
        return (cudaError_t.cudaSuccess,) if self.graphs.pop(graph, None) is not None else (
            cudaError_t.cudaErrorInvalidValue,)

    cudaGraphExecDestroy = cudaGraphDestroy

    def module(self, name: str = "cuda.bindings.runtime") -> types.ModuleType:
        module = types.ModuleType(name)
        for name in ("cudaError_t", "cudaMemcpyKind", "cudaStreamCaptureMode", "cudaStream_t"):
            setattr(module, name, globals()[name])
        for name in dir(self):
            if name.startswith("cuda"):
                setattr(module, name, getattr(self, name))
        module.fake = self  # type: ignore[attr-defined]
        return module


LAYOUTS = ("12.6+", "bindings", "12.2-12.5")


def install(monkeypatch: Any, runtime: FakeCudaRuntime | None = None, layout: str = "12.6+") -> FakeCudaRuntime:
    """Put a fake runtime in ``sys.modules`` under the module names of one cuda-python ``layout`` (see above)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    runtime = runtime or FakeCudaRuntime()
    cuda_pkg = types.ModuleType("cuda")
    cuda_pkg.__path__ = []  # a namespace package: submodules only from sys.modules
    modules: dict[str, types.ModuleType | None] = {"cuda": cuda_pkg, "cuda.bindings": None,
                                                   "cuda.bindings.runtime": None, "cuda.cudart": None}
    if layout in ("12.6+", "bindings"):
        bindings = types.ModuleType("cuda.bindings")
        bindings.__path__ = []
        bindings.runtime = runtime.module("cuda.bindings.runtime")  # type: ignore[attr-defined]
        cuda_pkg.bindings = bindings  # type: ignore[attr-defined]
        modules.update({"cuda.bindings": bindings, "cuda.bindings.runtime": bindings.runtime})
    if layout in ("12.6+", "12.2-12.5"):
        cuda_pkg.cudart = runtime.module("cuda.cudart")  # type: ignore[attr-defined]
        modules["cuda.cudart"] = cuda_pkg.cudart
    for name, value in modules.items():  # None in sys.modules: "import" raises ImportError, as when absent
        monkeypatch.setitem(sys.modules, name, value)
    return runtime
