"""Run a bundle's TensorRT FP16 engine (TensorRT 10.x Python API).

An engine is bound to one TensorRT version, one GPU model and one ONNX file;
``engine.json`` (written by ``lungseg-export``) records all three, and
:func:`load_engine_predictor` checks them before deserialising anything. On a
mismatch it rebuilds the engine from the bundle's ONNX when the TensorRT builder
is available and the bundle is writable, else it refuses with the reasons.

``tensorrt`` is imported lazily. Device memory comes from cuda-python
(``cuda.bindings.runtime``, or the older ``cuda.cudart``) when installed, else
from torch. Whatever is missing surfaces as
:class:`~lungseg.predictors.BackendUnavailableError` naming the reason, so
:func:`lungseg.predictors.select_predictor` can fall back.

API used (TensorRT 10.x): ``Runtime.deserialize_cuda_engine``,
``ICudaEngine.num_io_tensors/get_tensor_name/get_tensor_dtype/get_tensor_shape``,
``IExecutionContext.set_input_shape/set_tensor_address/execute_async_v3``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from lungseg.bundle import ENGINE_FP16, ENGINE_MANIFEST, INPUT_NAME, ONNX_FP32, OUTPUT_NAME, Bundle, sha256_file
from lungseg.predictors import BackendUnavailableError

log = logging.getLogger(__name__)

BUILD_HINT = "lungseg-export --engine-only {bundle}"


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or :class:`BackendUnavailableError` saying it is not installed."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(f"the tensorrt Python package is not installed ({exc})") from exc
    return tensorrt


def _import_cudart() -> ModuleType | None:
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            return None
    return runtime


def cuda_device() -> tuple[str, str]:
    """``(GPU name, compute capability "major.minor")`` of CUDA device 0, or BackendUnavailableError."""
    cudart = _import_cudart()
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count < 1:
            raise BackendUnavailableError(f"no CUDA GPU visible (cudaGetDeviceCount: {err}, {count} devices)")
        err, props = cudart.cudaGetDeviceProperties(0)
        if err != cudart.cudaError_t.cudaSuccess:
            raise BackendUnavailableError(f"cudaGetDeviceProperties failed: {err}")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError("cannot query the GPU: install cuda-python (or torch with CUDA)") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError("no CUDA GPU visible to torch")
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}"


def tensorrt_unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built or run here, or ``None`` when it can."""
    try:
        import_tensorrt()
        cuda_device()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def check_engine_manifest(
    manifest: Mapping[str, Any],
    *,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    onnx_sha256: str,
    engine_sha256: str | None = None,
) -> list[str]:
    """Reasons why an engine described by ``manifest`` must not run here (empty list: it may)."""
    expected = {
        "tensorrt_version": trt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "onnx_sha256": onnx_sha256,
    }
    if engine_sha256 is not None:
        expected["engine_sha256"] = engine_sha256
    reasons = []
    for key, here in expected.items():
        recorded = manifest.get(key)
        if recorded is None:
            reasons.append(f"{ENGINE_MANIFEST} lacks {key!r}")
        elif str(recorded) != str(here):
            reasons.append(f"{key}: engine built for {recorded!r}, here {here!r}")
    if manifest.get("precision", "fp16") != "fp16":
        reasons.append(f"precision {manifest.get('precision')!r} is not fp16")
    return reasons


class _DeviceIO(Protocol):
    stream: int

    def address(self, name: str) -> int: ...
    def upload(self, name: str, array: np.ndarray) -> None: ...
    def download(self, name: str, out: np.ndarray) -> None: ...
    def synchronize(self) -> None: ...


class _CudartIO:
    """Device buffers and a stream from cuda-python."""

    def __init__(self, cudart: ModuleType, sizes: Mapping[str, int]):
        self._rt = cudart
        self.stream = int(self._call(cudart.cudaStreamCreate()))
        self._ptrs = {name: int(self._call(cudart.cudaMalloc(nbytes))) for name, nbytes in sizes.items()}

    def _call(self, result: tuple[Any, ...]) -> Any:
        if result[0] != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA runtime error {result[0]}")
        return result[1] if len(result) > 1 else None

    def address(self, name: str) -> int:
        return self._ptrs[name]

    def upload(self, name: str, array: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self._rt.cudaMemcpyAsync(self._ptrs[name], array.ctypes.data, array.nbytes, kind, self.stream))

    def download(self, name: str, out: np.ndarray) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self._rt.cudaMemcpyAsync(out.ctypes.data, self._ptrs[name], out.nbytes, kind, self.stream))

    def synchronize(self) -> None:
        self._call(self._rt.cudaStreamSynchronize(self.stream))

    def __del__(self) -> None:
        for ptr in getattr(self, "_ptrs", {}).values():
            self._rt.cudaFree(ptr)


class _TorchIO:
    """Device buffers from torch (when cuda-python is absent); copies run on torch's current stream."""

    def __init__(self, sizes: Mapping[str, int]):
        import torch

        self._torch = torch
        self._buffers = {n: torch.empty(b // 4, dtype=torch.float32, device="cuda") for n, b in sizes.items()}
        self.stream = int(torch.cuda.current_stream().cuda_stream)

    def address(self, name: str) -> int:
        return int(self._buffers[name].data_ptr())

    def upload(self, name: str, array: np.ndarray) -> None:
        self._buffers[name][: array.size].copy_(self._torch.from_numpy(array.reshape(-1)))

    def download(self, name: str, out: np.ndarray) -> None:
        out.reshape(-1)[:] = self._buffers[name][: out.size].cpu().numpy()

    def synchronize(self) -> None:
        self._torch.cuda.current_stream().synchronize()


class TensorRTPredictor:
    """``predict((N, 3, S, S) float32) -> (N, S, S)`` with a deserialised TensorRT engine."""

    backend = "tensorrt"
    precision = "fp16"

    def __init__(self, trt: ModuleType, engine_path: Path, manifest: Mapping[str, Any]):
        self.model_path = str(engine_path)
        self.manifest = dict(manifest)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise BackendUnavailableError(f"{engine_path}: TensorRT could not deserialise the engine")
        names = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        if names != {INPUT_NAME, OUTPUT_NAME}:
            raise BackendUnavailableError(f"{engine_path}: engine tensors {sorted(names)} are not image/probability")
        for name in names:
            if self._engine.get_tensor_dtype(name) != trt.float32:
                raise BackendUnavailableError(f"{engine_path}: {name} is {self._engine.get_tensor_dtype(name)}, "
                                              "expected float32 I/O")
        self._context = self._engine.create_execution_context()
        _, channels, size, _ = tuple(self._engine.get_tensor_shape(INPUT_NAME))
        self.input_shape = (int(channels), int(size), int(size))
        self.max_batch = int(manifest.get("profile", {}).get("max", 1))
        per_image = {INPUT_NAME: int(channels) * size * size * 4, OUTPUT_NAME: size * size * 4}
        sizes = {name: self.max_batch * nbytes for name, nbytes in per_image.items()}
        cudart = _import_cudart()
        self._io: _DeviceIO = _CudartIO(cudart, sizes) if cudart is not None else _TorchIO(sizes)
        for name in (INPUT_NAME, OUTPUT_NAME):
            self._context.set_tensor_address(name, self._io.address(name))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape[1:] != self.input_shape:
            raise ValueError(f"input shape {batch.shape[1:]} != engine input {self.input_shape}")
        outputs = []
        for start in range(0, len(batch), self.max_batch):
            chunk = batch[start:start + self.max_batch]
            if not self._context.set_input_shape(INPUT_NAME, chunk.shape):
                raise RuntimeError(f"engine rejected input shape {chunk.shape}")
            out = np.empty(tuple(self._context.get_tensor_shape(OUTPUT_NAME)), dtype=np.float32)
            self._io.upload(INPUT_NAME, chunk)
            if not self._context.execute_async_v3(self._io.stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            self._io.download(OUTPUT_NAME, out)
            self._io.synchronize()
            outputs.append(out[:, 0])
        return np.concatenate(outputs)


def _engine_files(bundle: Bundle) -> tuple[Path, dict[str, Any]]:
    engine, manifest_path = bundle.variant(ENGINE_FP16), bundle.variant(ENGINE_MANIFEST)
    if engine is None or manifest_path is None:
        missing = ENGINE_FP16 if engine is None else ENGINE_MANIFEST
        raise BackendUnavailableError(
            f"{bundle.root}: bundle has no {missing}; build it on the device with: "
            + BUILD_HINT.format(bundle=bundle.root)
        )
    unreadable = f"{manifest_path}: not a readable engine manifest; rebuild with: " + BUILD_HINT.format(
        bundle=bundle.root)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise BackendUnavailableError(f"{unreadable} ({exc})") from exc
    if not isinstance(manifest, dict):
        raise BackendUnavailableError(unreadable)
    return engine, manifest


def _rebuild(bundle: Bundle, manifest: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    reasons = "; ".join(problems)
    try:
        from lungseg.export.tensorrt_build import EngineSettings, build_engine

        log.warning("%s: rebuilding the TensorRT engine (%s)", bundle.root, reasons)
        return build_engine(bundle.root, EngineSettings.from_manifest(manifest))
    except Exception as exc:  # any build failure means: refuse, with both reasons
        raise BackendUnavailableError(
            f"{bundle.root / ENGINE_FP16} does not match this machine ({reasons}) and could not be "
            f"rebuilt here ({type(exc).__name__}: {exc})"
        ) from exc


def load_engine_predictor(bundle: Bundle, *, rebuild: bool = True) -> TensorRTPredictor:
    """The bundle's FP16 engine as a predictor, after checking ``engine.json`` against this machine."""
    engine, manifest = _engine_files(bundle)
    trt = import_tensorrt()
    gpu_name, capability = cuda_device()
    onnx_file = bundle.root / str(manifest.get("onnx_file", ONNX_FP32))
    if not onnx_file.is_file():
        raise BackendUnavailableError(f"{onnx_file}: the ONNX file the engine was built from is missing")
    problems = check_engine_manifest(
        manifest, trt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
        onnx_sha256=sha256_file(onnx_file), engine_sha256=sha256_file(engine),
    )
    if problems:
        if not rebuild:
            raise BackendUnavailableError(f"{engine} does not match this machine: {'; '.join(problems)}")
        manifest = _rebuild(bundle, manifest, problems)
    return TensorRTPredictor(trt, engine, manifest)
