"""Every inference backend a bundle can run on, each available or with the reason it is not.

Names (stable, used as JSON keys): ``pytorch`` (the checkpoint, eager CPU: the
reference), ``onnxruntime-cpu`` (model.onnx), ``onnxruntime-fp16``
(model.fp16.onnx, on CUDA when onnxruntime has it, else CPU), ``onnxruntime-int8``
(model.int8.onnx, CPU), ``onnxruntime-cuda`` (model.onnx), ``tensorrt-fp16``, and where the ``[openvino]``
extra is installed ``openvino-int8`` (the NNCF IR), ``openvino-bf16`` (model.onnx, native bf16 CPUs only),
``openvino-fp32`` (model.onnx) and, only where OpenVINO finds an Intel GPU or NPU, ``openvino-gpu`` /
``openvino-npu`` (the NNCF IR on that device).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from lungseg.bundle import ONNX_FP16, ONNX_INT8, Bundle
from lungseg.openvino_runtime import accelerator_devices, load_openvino, load_openvino_device, openvino_installed
from lungseg.predictors import BackendOptions, BackendUnavailableError, OnnxRuntimePredictor, Predictor
from lungseg.tensorrt_runtime import load_engine_predictor

log = logging.getLogger(__name__)

REFERENCE = "pytorch"
CPU_FP32 = "onnxruntime-cpu"
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Backend:
    """A backend and its predictor, or ``predictor is None`` with ``reason`` saying why."""

    name: str
    predictor: Predictor | None = None
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.predictor is not None

    def describe(self) -> dict[str, str | bool | None]:
        if self.predictor is None:
            return {"available": False, "reason": self.reason}
        device = ("cuda" if self.predictor.backend in ("cuda", "tensorrt")
                  else str(getattr(self.predictor, "device", "cpu")).lower())
        described: dict[str, str | bool | None] = {"available": True, "precision": self.predictor.precision,
                                                   "device": device, "model": Path(self.predictor.model_path).name}
        isa = getattr(self.predictor, "isa", None)
        if isa:
            described["isa"] = str(isa)
        return described

def _pytorch(checkpoint: Path | None, threads: int) -> Predictor:
    if checkpoint is None or not checkpoint.is_file():
        raise BackendUnavailableError(f"no PyTorch checkpoint ({checkpoint or CHECKPOINT_NAME} not found; "
                                      "pass --checkpoint)")
    try:  # torch is the [train] extra, and loads only now: after the DICOM path was timed (see runner.run)
        from lungseg.nn.checkpoint import CheckpointError, TorchPredictor, load_checkpoint
    except ImportError as exc:
        raise BackendUnavailableError(f"torch is not installed ({exc})") from exc
    try:
        return TorchPredictor(load_checkpoint(checkpoint), threads)
    except CheckpointError as exc:
        raise BackendUnavailableError(str(exc)) from exc


def _variant(bundle: Bundle, name: str, device: str, threads: int) -> Predictor:
    path = bundle.variant(name)
    if path is None:
        raise BackendUnavailableError(f"bundle has no {name} (export it with lungseg-export)")
    return OnnxRuntimePredictor(str(path), device=device, threads=threads)


def _fp16_device() -> str:
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def discover(bundle: Bundle, checkpoint: Path | None, threads: int) -> list[Backend]:
    """Try every backend; unavailable ones keep their reason (logged at INFO)."""
    factories: dict[str, Callable[[], Predictor]] = {
        REFERENCE: lambda: _pytorch(checkpoint, threads),
        CPU_FP32: lambda: OnnxRuntimePredictor(str(bundle.onnx), device="cpu", threads=threads),
        "onnxruntime-fp16": lambda: _variant(bundle, ONNX_FP16, _fp16_device(), threads),
        "onnxruntime-int8": lambda: _variant(bundle, ONNX_INT8, "cpu", threads),
        "onnxruntime-cuda": lambda: OnnxRuntimePredictor(str(bundle.onnx), device="cuda"),
        "tensorrt-fp16": lambda: load_engine_predictor(bundle),
    }
    if openvino_installed():
        options = BackendOptions(threads=threads)
        for precision in ("int8", "bf16", "fp32"):
            factories[f"openvino-{precision}"] = lambda p=precision: load_openvino(bundle, p, options)
        for device in accelerator_devices():
            factories[f"openvino-{device.lower()}"] = lambda d=device: load_openvino_device(bundle, d, options)
    backends = []
    for name, factory in factories.items():
        try:
            backends.append(Backend(name, factory()))
        except BackendUnavailableError as exc:
            log.info("backend %s skipped: %s", name, exc)
            backends.append(Backend(name, reason=str(exc)))
    return backends
