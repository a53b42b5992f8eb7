"""Inference backends behind one interface: ``predict(batch) -> probabilities``.

Backends, best first: TensorRT engine, onnxruntime CUDA, onnxruntime CPU. The
choice and the reason for every fallback are logged; a session that silently
lost its GPU provider is reported as CPU, never as CUDA.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from lungseg.bundle import INPUT_NAME, Bundle

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "cuda", "cpu")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


class Predictor(Protocol):
    """``predict`` maps ``(N, 3, S, S)`` float32 model input to ``(N, S, S)`` probabilities."""

    backend: str
    precision: str
    model_path: str

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


class OnnxRuntimePredictor:
    """An onnxruntime session on the CPU or CUDA execution provider."""

    def __init__(self, model_path: str, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else [
            "CPUExecutionProvider"
        ]
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                "(install onnxruntime-gpu instead of onnxruntime, never both)"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model_path, options, providers=wanted)
        actual = self.session.get_providers()
        if device == "cuda" and actual[0] != "CUDAExecutionProvider":
            raise BackendUnavailableError(f"CUDA provider failed to initialise (session has {actual})")
        self.backend = "cuda" if device == "cuda" else "cpu"
        self.providers = actual
        self.model_path = model_path
        self.precision = "fp16" if ".fp16." in os.path.basename(model_path) else (
            "int8" if ".int8." in os.path.basename(model_path) else "fp32"
        )
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return out[:, 0].astype(np.float32, copy=False)


@dataclass
class Selection:
    """The predictor chosen at start-up and why the better ones were not."""

    predictor: Predictor
    fallbacks: list[str] = field(default_factory=list)


def select_predictor(bundle: Bundle, backend: str = "auto", threads: int | None = None) -> Selection:
    """Choose a backend: TensorRT -> onnxruntime CUDA -> onnxruntime CPU (for ``auto``).

    An explicit backend that cannot run raises :class:`BackendUnavailableError`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    order = ["tensorrt", "cuda", "cpu"] if backend == "auto" else [backend]
    fallbacks: list[str] = []
    for name in order:
        try:
            predictor = _make(name, bundle, threads)
        except BackendUnavailableError as exc:
            if backend != "auto":
                raise
            fallbacks.append(f"{name}: {exc}")
            log.warning("backend %s unavailable: %s", name, exc)
            continue
        log.warning(
            "inference backend: %s (%s, %s)%s", predictor.backend, predictor.precision,
            predictor.model_path, f"; fell back because {'; '.join(fallbacks)}" if fallbacks else "",
        )
        return Selection(predictor, fallbacks)
    raise BackendUnavailableError("; ".join(fallbacks))


def _make(name: str, bundle: Bundle, threads: int | None) -> Predictor:
    if name == "tensorrt":
        from lungseg.tensorrt_runtime import load_engine_predictor

        return load_engine_predictor(bundle)
    if name == "cuda":
        return OnnxRuntimePredictor(str(bundle.onnx), device="cuda")
    return OnnxRuntimePredictor(str(bundle.onnx), device="cpu", threads=threads)


__all__ = ["BACKENDS", "INPUT_NAME", "BackendUnavailableError", "OnnxRuntimePredictor", "Predictor",
           "Selection", "select_predictor"]
