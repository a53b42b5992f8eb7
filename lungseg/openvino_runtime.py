"""The OpenVINO CPU backend (the ``[openvino]`` extra): int8 IR from NNCF, bf16 and fp32 from ``model.onnx``.

Three candidates, each a :class:`OpenVINOPredictor` with the interface of every backend:

* ``openvino-int8``: the bundle's ``model.openvino.int8.xml`` + ``.bin`` (NNCF post-training
  quantisation written by ``lungseg-export --openvino``), checked against ``bundle.json``;
* ``openvino-bf16``: ``model.onnx`` compiled with ``INFERENCE_PRECISION_HINT=bf16``, offered only
  where the CPU plugin lists ``BF16`` in ``OPTIMIZATION_CAPABILITIES`` (native bf16: AVX-512 BF16 or
  AMX); elsewhere OpenVINO would emulate it, slower than fp32;
* ``openvino-fp32``: ``model.onnx`` with ``INFERENCE_PRECISION_HINT=f32``;
* ``openvino-gpu`` / ``openvino-npu``: the int8 IR on an Intel integrated GPU or NPU, offered only where
  OpenVINO lists the device in ``Core.available_devices`` (its driver installed and the device visible to
  the process). Accelerators get a static batch-1 shape (the NPU compiles static shapes only; the GPU
  would otherwise recompile per batch size) and a batch runs image by image; the device keeps its own
  inference precision (f16 where the IR is not quantised on the iGPU).

``openvino`` is imported only when a candidate is built: an install without the extra never
imports it (:func:`openvino_installed` looks for the package without importing it).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.backend_api import BackendOptions, BackendUnavailableError
from lungseg.bundle import ONNX_FP32, Bundle, verified_file

log = logging.getLogger(__name__)

OPENVINO_INT8_XML = "model.openvino.int8.xml"
OPENVINO_INT8_BIN = "model.openvino.int8.bin"
OPENVINO_PRECISIONS = ("int8", "bf16", "fp32")
ACCELERATORS = ("GPU", "NPU")  # OpenVINO device plugins besides CPU that a candidate may run on
INSTALL_HINT = "pip install 'lungseg[openvino]'"


def openvino_installed() -> bool:
    """Whether the ``openvino`` package is importable here (found without importing it)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # a broken or half-removed install counts as absent
        return False


def _core() -> Any:
    try:
        import openvino as ov  # the [openvino] extra: imported only when an OpenVINO candidate is built
    except ImportError as exc:
        raise BackendUnavailableError(f"openvino is not installed ({INSTALL_HINT}): {exc}") from exc
    return ov.Core()


def cpu_capabilities(core: Any | None = None) -> list[str]:
    """The CPU plugin's ``OPTIMIZATION_CAPABILITIES`` (e.g. ``["BF16", "FP32", "INT8", ...]``)."""
    core = core or _core()
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def _available_devices(core: Any) -> list[str]:
    """Every device OpenVINO lists (``["CPU", "GPU.0", "GPU.1", "NPU"]``); ``[]`` where listing fails."""
    try:
        return [str(d) for d in core.available_devices]
    except Exception as exc:  # a plugin whose driver is broken must not stop the CPU candidates
        log.warning("OpenVINO could not list its devices: %s: %s", type(exc).__name__, exc)
        return []


def accelerator_devices(core: Any | None = None, listed: list[str] | None = None) -> list[str]:
    """The kinds of Intel accelerator OpenVINO finds here, ``GPU.0``/``GPU.1`` counted once as ``GPU``
    (``["GPU", "NPU"]``; often none). ``listed`` is an already-read device list."""
    found = _available_devices(core or _core()) if listed is None else listed
    return [kind for kind in ACCELERATORS if any(d.split(".")[0] == kind for d in found)]


def native_bf16(core: Any | None = None) -> bool:
    """True where OpenVINO's CPU plugin runs bf16 natively (it lists ``BF16``)."""
    return "BF16" in cpu_capabilities(core)


class OpenVINOPredictor:
    """One compiled OpenVINO model on a device (``CPU`` unless told otherwise); ``(N,3,S,S)`` -> ``(N,S,S)``."""

    def __init__(self, model_path: Path, precision: str, *, options: BackendOptions | None = None,
                 device: str = "CPU", core: Any | None = None, static_batch: bool | None = None):
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"precision must be one of {OPENVINO_PRECISIONS}, got {precision!r}")
        options = options or BackendOptions()
        core = core or _core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        on_cpu = device.split(".")[0] == "CPU"
        # accelerators run a static batch of one (see the module docstring); the CPU any batch size
        self.static_batch = (not on_cpu) if static_batch is None else static_batch
        if on_cpu:  # an accelerator keeps its own inference precision and has no CPU threads to set
            config["INFERENCE_PRECISION_HINT"] = "bf16" if precision == "bf16" else "f32"
            if options.threads:
                config["INFERENCE_NUM_THREADS"] = int(options.threads)
        try:
            model = core.read_model(str(model_path))
            if self.static_batch:
                shape = model.input(0).get_partial_shape()
                shape[0] = 1
                model.reshape({model.input(0): shape})
            self._compiled = core.compile_model(model, device, config)
            self._request = self._compiled.create_infer_request()
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for unreadable models
            raise BackendUnavailableError(f"{model_path.name}: OpenVINO could not load it "
                                          f"({type(exc).__name__}: {str(exc).strip()[:300]})") from exc
        self.backend = "openvino"  # which device runs it is ``device`` (every output names both)
        self.device = device
        self.precision = precision
        self.model_path = str(model_path)
        self.isa = _isa(core, device)
        try:
            actual = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        except Exception:  # a plugin without the property (NPU): its own precision, not stated
            actual = "device default"
        self.inference_precision = actual.replace("<Type: '", "").replace("'>", "")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.static_batch:
            return np.concatenate([self._infer(batch[i:i + 1]) for i in range(batch.shape[0])])
        return self._infer(batch)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        result = self._request.infer({0: batch})
        out = np.asarray(next(iter(result.values())))
        return out[:, 0].astype(np.float32, copy=False)

    def close(self) -> None:
        self._request = None
        self._compiled = None


def _isa(core: Any, device: str) -> str:
    """What the runtime says about the hardware: the device name and its optimisation capabilities."""
    try:
        return (f"{core.get_property(device, 'FULL_DEVICE_NAME')}; "
                f"{','.join(str(c) for c in core.get_property(device, 'OPTIMIZATION_CAPABILITIES'))}")
    except Exception as exc:  # informational only
        return f"unknown ({exc})"


def _int8_ir(bundle: Bundle) -> Path:
    try:
        xml = verified_file(bundle.root, OPENVINO_INT8_XML)
        verified_file(bundle.root, OPENVINO_INT8_BIN)
    except ValueError as exc:
        raise BackendUnavailableError(str(exc)) from exc
    return xml


def load_openvino_device(bundle: Bundle, device: str, options: BackendOptions | None = None) -> OpenVINOPredictor:
    """The ``openvino-gpu`` / ``openvino-npu`` candidate: the bundle's int8 IR on an accelerator OpenVINO finds."""
    core = _core()
    listed = _available_devices(core)
    if device not in accelerator_devices(listed=listed):
        raise BackendUnavailableError(f"OpenVINO finds no {device} device here (it lists {listed}; an Intel "
                                      f"{device} needs its driver and access to its device node, see "
                                      f"packaging/INSTALL.md)")
    return OpenVINOPredictor(_int8_ir(bundle), "int8", options=options, device=device, core=core)


def load_openvino(bundle: Bundle, precision: str, options: BackendOptions | None = None) -> OpenVINOPredictor:
    """The ``openvino-<precision>`` candidate of ``bundle``; :class:`BackendUnavailableError` says why not."""
    core = _core()
    if precision == "int8":
        return OpenVINOPredictor(_int8_ir(bundle), "int8", options=options, core=core)
    if precision == "bf16" and not native_bf16(core):
        raise BackendUnavailableError(f"this CPU has no native bf16 (OpenVINO capabilities "
                                      f"{cpu_capabilities(core)}): bf16 would be emulated")
    if bundle.onnx.name != ONNX_FP32:
        raise BackendUnavailableError(f"{bundle.onnx.name}: the OpenVINO {precision} path compiles {ONNX_FP32}")
    return OpenVINOPredictor(bundle.onnx, precision, options=options, core=core)


__all__ = ["ACCELERATORS", "OPENVINO_INT8_BIN", "OPENVINO_INT8_XML", "OPENVINO_PRECISIONS", "OpenVINOPredictor",
           "accelerator_devices", "cpu_capabilities", "load_openvino", "load_openvino_device", "native_bf16",
           "openvino_installed"]
