"""Run a bundle's TensorRT FP16 engine: find or build it, check it, serve it (TensorRT 8.6 / 10.x).

:func:`load_engine_predictor` never serves an unchecked engine:

1. the engine key (:class:`lungseg.engine_cache.EngineKey`: exact device, TensorRT
   version, ONNX hash, build settings) is computed here;
2. an engine shipped in the bundle is used only when its ``engine.json`` records
   that key and a passed parity check; else the engine cache in the state
   directory is searched; else, unless a refusal is recorded for that key, the
   engine is built there under a file lock (never into the bundle, which may be
   read-only);
3. a newly built engine is run on the bundle's golden set (its reference fp32
   outputs, shipped inside the bundle) before it is stored: an engine that fails is
   refused, the reason logged and recorded, and the caller falls back.

:class:`TensorRTPredictor` sizes its device buffers from the engine's own
optimisation profile, stages through pinned host memory, runs on a stream it
creates and destroys, and can replay batch-1 inference as a CUDA graph. CUDA
failures surface as :class:`lungseg.predictors.BackendRuntimeError` so the
serving chain demotes instead of failing the input.

API used: ``Runtime.deserialize_cuda_engine``, ``ICudaEngine.num_io_tensors /
get_tensor_name / get_tensor_mode / get_tensor_dtype / get_tensor_shape /
get_tensor_profile_shape / create_execution_context``, ``IExecutionContext.
set_input_shape / set_tensor_address / execute_async_v3``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import lungseg
from lungseg.backend_api import BackendOptions, BackendRuntimeError, BackendUnavailableError
from lungseg.bundle import ENGINE_MANIFEST, INPUT_NAME, OUTPUT_NAME, Bundle, sha256_file
from lungseg.cuda_memory import (
    CudaError,
    CudaUnavailableError,
    DeviceIdentity,
    IOBuffers,
    check,
    device_identity,
    import_cudart,
)
from lungseg.engine_cache import EngineCache, EngineKey, usable_engine
from lungseg.selftest import GoldenSetError, load_golden, run_selftest
from lungseg.tensorrt_build import (
    EngineBuildError,
    build_serialized,
    choose_source,
    engine_settings,
    fp32_source,
    make_logger,
    supported_reason,
)

log = logging.getLogger(__name__)

BUILD_HINT = "lungseg-edge build-engine --model {bundle} --state STATE_DIR"


def _bindings_without_front_end() -> bool:
    """The x86 bindings wheel (module ``tensorrt_bindings``) is there, the front-end (``tensorrt``) is not."""
    if sys.modules.get("tensorrt_bindings") is not None:
        return True
    try:
        return importlib.util.find_spec("tensorrt_bindings") is not None
    except (ImportError, ValueError):
        return False


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module (8.6 or newer), or :class:`BackendUnavailableError` saying why not."""
    try:
        import tensorrt
    except ImportError as exc:
        if _bindings_without_front_end():
            raise BackendUnavailableError(
                "tensorrt-cu12-bindings is installed without the tensorrt-cu12 front-end that provides "
                "`import tensorrt`: pip install 'tensorrt-cu12>=10.3,<11' (the [gpu] extra; packaging/INSTALL.md)"
            ) from exc
        raise BackendUnavailableError(f"the tensorrt Python package is not installed ({exc})") from exc
    reason = supported_reason(tensorrt)
    if reason:
        raise BackendUnavailableError(reason)
    return tensorrt


def cuda_device_identity() -> DeviceIdentity:
    """Identity of CUDA device 0 (what an engine is bound to), or :class:`BackendUnavailableError`."""
    try:
        return device_identity(0)
    except (CudaUnavailableError, CudaError) as exc:
        raise BackendUnavailableError(str(exc)) from exc


def cuda_device() -> tuple[str, str]:
    """``(GPU name, compute capability "major.minor")`` of CUDA device 0, or :class:`BackendUnavailableError`."""
    identity = cuda_device_identity()
    return identity.name, identity.compute_capability


def tensorrt_unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built or run here, or ``None`` when it can."""
    try:
        import_tensorrt()
        cuda_device()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def _dims(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


class TensorRTPredictor:
    """``predict((N, 3, S, S) float32) -> (N, S, S)`` with a deserialised engine; :meth:`close` frees the GPU."""

    backend = "tensorrt"
    precision = "fp16"

    def __init__(self, trt: ModuleType, engine_bytes: bytes, *, model_path: str, dla_core: int | None = None,
                 cuda_graph: bool = False, cudart: ModuleType | None = None, precision: str = "fp16"):
        self.model_path = model_path
        self.precision = precision  # "fp32" for the engine rebuilt after an fp16 one failed its parity check
        self._io: IOBuffers | None = None
        self._graph: Any = None
        self._graph_exec: Any = None
        self._graph_stale = False  # another input shape ran since the capture: capture again before replaying
        self._rt = cudart or import_cudart()
        self._logger = make_logger(trt)  # the process's one TensorRT logger; this predictor's errors from the mark
        self._log_mark = self._logger.mark()
        self._runtime = trt.Runtime(self._logger)
        if dla_core is not None:
            self._runtime.DLA_core = int(dla_core)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise BackendUnavailableError(f"{Path(model_path).name}: TensorRT could not deserialise the engine ("
                                          + self._logged() + ")")
        names = {self._engine.get_tensor_name(i): self._engine.get_tensor_mode(self._engine.get_tensor_name(i))
                 for i in range(self._engine.num_io_tensors)}
        expected = {INPUT_NAME: trt.TensorIOMode.INPUT, OUTPUT_NAME: trt.TensorIOMode.OUTPUT}
        if names != expected:
            raise BackendUnavailableError(f"engine tensors {names} are not image (input) / probability (output)")
        for name in names:
            if self._engine.get_tensor_dtype(name) != trt.float32:
                raise BackendUnavailableError(f"engine {name} is {self._engine.get_tensor_dtype(name)}, "
                                              "expected float32 I/O")
        low, _, high = (_dims(d) for d in self._engine.get_tensor_profile_shape(INPUT_NAME, 0))
        self.max_batch, self.input_shape = high[0], high[1:]
        out_shape = _dims(self._engine.get_tensor_shape(OUTPUT_NAME))
        if any(d <= 0 for d in out_shape[1:]) or len(self.input_shape) != 3:
            raise BackendUnavailableError(f"unexpected engine shapes: input profile max {high}, output {out_shape}")
        self.output_shape = out_shape[1:]
        self.min_batch = low[0]
        self._in_items = int(np.prod(self.input_shape))
        self._out_items = int(np.prod(self.output_shape))
        context = self._engine.create_execution_context()
        if context is None:
            raise BackendUnavailableError("TensorRT could not create an execution context (out of GPU memory?): "
                                          + self._logged())
        self._context = context
        try:
            self._io = IOBuffers({INPUT_NAME: self.max_batch * self._in_items * 4,
                                  OUTPUT_NAME: self.max_batch * self._out_items * 4}, self._rt)
            for name in (INPUT_NAME, OUTPUT_NAME):
                if not self._context.set_tensor_address(name, self._io.address(name)):
                    raise BackendUnavailableError(f"TensorRT refused the device address of {name}")
            if cuda_graph and self.min_batch <= 1:
                try:
                    self._capture_graph()
                except (CudaError, BackendRuntimeError) as exc:  # e.g. layers on a DLA: run without a graph
                    log.warning("CUDA graph capture failed (%s); running without CUDA graphs", exc)
                    self._destroy_graph()
        except CudaError as exc:
            self.close()
            raise BackendUnavailableError(f"CUDA setup failed: {exc}") from exc
        except BaseException:
            self.close()
            raise

    # --- inference -----------------------------------------------------------
    def _enqueue(self, n: int) -> None:
        assert self._io is not None and self._io.stream is not None
        self._io.upload(INPUT_NAME, n * self._in_items * 4)
        if not self._context.execute_async_v3(self._io.stream.handle):
            raise BackendRuntimeError("TensorRT execute_async_v3 failed: " + self._logged(last=3))
        self._io.download(OUTPUT_NAME, n * self._out_items * 4)

    def _logged(self, last: int | None = None) -> str:
        """The TensorRT errors logged since this predictor was made (the last ``last``), or "no reason logged"."""
        errors = self._logger.errors_since(self._log_mark)
        return "; ".join(errors[-last:] if last else errors) or "no reason logged"

    def _capture_graph(self) -> None:
        """Record upload + inference + download of one image as a CUDA graph (replayed for batch 1)."""
        assert self._io is not None and self._io.stream is not None
        rt, stream = self._rt, self._io.stream
        if not self._context.set_input_shape(INPUT_NAME, (1, *self.input_shape)):
            return
        self._enqueue(1)  # TensorRT allocates lazily on the first run; never inside a capture
        stream.synchronize()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt, "cudaStreamBeginCapture", rt.cudaStreamBeginCapture(stream.raw, mode))
        try:
            self._enqueue(1)
        finally:  # the capture always ends, and a graph it made is kept for _destroy_graph even if enqueue raised
            self._graph = check(rt, "cudaStreamEndCapture", rt.cudaStreamEndCapture(stream.raw))
        self._graph_exec = check(rt, "cudaGraphInstantiate", rt.cudaGraphInstantiate(self._graph, 0))
        log.info("TensorRT batch-1 inference captured as a CUDA graph")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise ValueError(f"input shape {batch.shape} does not fit the engine input (N, {self.input_shape})")
        if self._io is None:
            raise BackendRuntimeError("the TensorRT predictor was closed")
        outputs = []
        try:
            for start in range(0, len(batch), self.max_batch):
                chunk = batch[start:start + self.max_batch]
                outputs.append(self._run(chunk))
        except CudaError as exc:
            raise BackendRuntimeError(str(exc)) from exc
        return np.concatenate(outputs)

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        assert self._io is not None
        n = len(chunk)
        if n == 1 and self._graph_exec is not None and self._graph_stale:
            self._destroy_graph()
            self._graph_stale = False
            try:
                self._capture_graph()
            except (CudaError, BackendRuntimeError) as exc:  # the engine still runs: without the graph from now on
                log.warning("CUDA graph re-capture failed (%s); running without CUDA graphs", exc,
                            extra={"event": "cuda_graph_off"})
                self._destroy_graph()
        self._io.stage(INPUT_NAME, chunk)
        if n == 1 and self._graph_exec is not None:
            if not self._context.set_input_shape(INPUT_NAME, chunk.shape):
                raise BackendRuntimeError(f"engine rejected input shape {chunk.shape}")
            assert self._io.stream is not None
            check(self._rt, "cudaGraphLaunch", self._rt.cudaGraphLaunch(self._graph_exec, self._io.stream.raw))
        else:
            if not self._context.set_input_shape(INPUT_NAME, chunk.shape):
                raise BackendRuntimeError(f"engine rejected input shape {chunk.shape}")
            self._enqueue(n)
            self._graph_stale = self._graph_exec is not None and n != 1
        self._io.synchronize()
        return self._io.result(OUTPUT_NAME, n * self._out_items).reshape(n, *self.output_shape)[:, 0]

    def _destroy_graph(self) -> None:
        rt = self._rt
        for attr, destroy in (("_graph_exec", "cudaGraphExecDestroy"), ("_graph", "cudaGraphDestroy")):
            handle = getattr(self, attr, None)
            if handle is not None:
                setattr(self, attr, None)
                try:
                    check(rt, destroy, getattr(rt, destroy)(handle))
                except CudaError as exc:
                    log.warning("releasing the CUDA graph: %s", exc)

    def close(self) -> None:
        """Release graph, buffers, stream, context and engine (safe to call twice, and on a dead GPU)."""
        self._destroy_graph()
        if self._io is not None:
            self._io.close()
            self._io = None
        self._context = None
        self._engine = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: modules may be gone
            self.close()


# --- finding, building and checking engines ----------------------------------------------------------------------
def engine_key(trt: ModuleType, bundle_dir: Path, settings: Any, device: DeviceIdentity,
               fp32: bool = False) -> tuple[EngineKey, Path, str]:
    """``(key, ONNX source, typing)`` of the engine this bundle needs on this device (``fp32``: of the
    full-precision engine that replaces an fp16 one that failed its parity check here)."""
    onnx_path, typing = fp32_source(trt, bundle_dir) if fp32 else choose_source(trt, bundle_dir, settings)
    key = EngineKey(device=device, tensorrt_version=str(trt.__version__), onnx_file=onnx_path.name,
                    onnx_sha256=sha256_file(onnx_path), settings={**settings.key_fields(), "typing": typing})
    return key, onnx_path, typing


def parity_gate(predictor: TensorRTPredictor, bundle_dir: Path) -> dict[str, Any]:
    """The engine's outputs on the bundle's golden set vs its reference fp32 outputs (``passed`` decides)."""
    try:
        golden = load_golden(bundle_dir)
    except GoldenSetError as exc:
        return {"passed": False, "reason": f"no reference outputs to check the engine against: {exc}"}
    result = run_selftest(predictor, golden).to_dict()
    result["golden_sha256"] = golden.sha256[:16]
    if not result["passed"] and not result["reason"]:
        result["reason"] = "engine masks differ from the reference"
    return result


def _refused(trt: ModuleType, bundle_dir: Path, settings: Any, cache: EngineCache, key: EngineKey, typing: str,
             keepalive: Callable[[str], object] | None, earlier: str | None, reason: str,
             details: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Record that ``key``'s engine was refused (``reason``). An fp16 engine that would not build or load, or lost
    accuracy (fp16 engines producing NaNs are reported on Orin), is rebuilt once at fp32 (TF32 off) before the
    chain leaves TensorRT; both attempts are recorded. An fp32 engine refused: :class:`BackendUnavailableError`."""
    cache.refuse(key, reason, details)
    if typing == "fp32":
        raise BackendUnavailableError(f"{earlier}; then the {reason}" if earlier else reason)
    log.warning("rebuilding the engine at fp32 (TF32 off) on this device after: %s", reason,
                extra={"event": "engine_fp32_retry"})
    key32, onnx32, typing32 = engine_key(trt, bundle_dir, settings, key.device, fp32=True)
    return build_checked_engine(trt, bundle_dir, settings, cache, key32, onnx32, typing32, keepalive, earlier=reason)


def build_checked_engine(trt: ModuleType, bundle_dir: Path, settings: Any, cache: EngineCache, key: EngineKey,
                         onnx_path: Path, typing: str, keepalive: Callable[[str], object] | None = None, *,
                         earlier: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Build the engine for ``key``, gate it on parity, store it in ``cache``; refuses (and records) on failure.

    An fp16 engine that fails is refused and rebuilt once at fp32 (``earlier``: why the fp16 one was refused)."""
    try:
        engine_bytes, facts = build_serialized(trt, onnx_path, typing, settings, keepalive)
    except EngineBuildError as exc:  # recorded like a parity failure: not rebuilt at every start (--force retries)
        return _refused(trt, bundle_dir, settings, cache, key, typing, keepalive, earlier,
                        f"TensorRT engine build failed: {exc}", {"stage": "build", "typing": typing})
    try:
        candidate = TensorRTPredictor(trt, engine_bytes, model_path=str(cache.folder(key) / "unchecked.engine"),
                                      dla_core=settings.dla_core, cudart=None)
    except BackendUnavailableError as exc:  # built, but will not load here: recorded, not rebuilt at every start
        reason = f"new {facts['precision']} engine built but would not load: {exc}"
        log.error("%s; refused (recorded in %s)", reason, cache.folder(key), extra={"event": "engine_refused"})
        return _refused(trt, bundle_dir, settings, cache, key, typing, keepalive, earlier, reason,
                        {"stage": "load", "typing": typing})
    try:
        parity = parity_gate(candidate, bundle_dir)
    finally:
        candidate.close()
    if not parity.get("passed"):
        reason = f"new {facts['precision']} engine failed its parity check: {parity.get('reason') or parity}"
        log.error("%s; refused (recorded in %s)", reason, cache.folder(key), extra={"event": "engine_refused"})
        return _refused(trt, bundle_dir, settings, cache, key, typing, keepalive, earlier, reason, parity)
    manifest = {**facts, "onnx_file": onnx_path.name, "onnx_sha256": key.onnx_sha256,
                **({"fp16_attempt": earlier} if earlier else {}),
                "tensorrt_version": trt.__version__, "device": key.device.to_dict(), "parity": parity,
                "lungseg_version": lungseg.__version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = cache.store(key, engine_bytes, manifest)
    log.warning("TensorRT engine built, parity passed (mean Dice %.4f), stored in %s", parity.get("dice_mean", 0),
                path.parent, extra={"event": "engine_built"})
    return path, json.loads((path.parent / ENGINE_MANIFEST).read_text())


def ensure_engine(bundle: Bundle, options: BackendOptions, *, settings: Any = None, force: bool = False,
                  trt: ModuleType | None = None) -> tuple[Path, dict[str, Any], str]:
    """``(engine path, manifest, where)`` of a parity-passed engine for this device, building one if needed."""
    trt = trt or import_tensorrt()
    device = cuda_device_identity()
    settings = settings or engine_settings(options.dla_core)
    try:
        key, onnx_path, typing = engine_key(trt, bundle.root, settings, device)
    except EngineBuildError as exc:
        raise BackendUnavailableError(str(exc)) from exc
    if not force:
        shipped = usable_engine(bundle.root, key)
        if shipped is not None:
            return shipped[0], shipped[1], "bundle"
    cache = EngineCache(options.engine_cache)
    if not force and (found := cache.lookup(key)) is not None:
        return found[0], found[1], "cache"
    refusal = None if force else cache.refusal(key)
    earlier: str | None = None
    if refusal is not None and typing != "fp32":  # the fp16 engine failed here: the fp32 one serves if it passed
        key32, onnx32, typing32 = engine_key(trt, bundle.root, settings, device, fp32=True)
        if (found := cache.lookup(key32)) is not None:
            return found[0], found[1], "cache"
        refusal32 = cache.refusal(key32)
        if refusal32 is None:  # no fp32 attempt on record (e.g. interrupted): make it now
            earlier = str(refusal.get("reason") or "the fp16 engine failed its parity check")
            key, onnx_path, typing = key32, onnx32, typing32
        refusal = refusal32
    if refusal is not None:
        raise BackendUnavailableError(f"the engine for this device was refused earlier ({refusal.get('reason')}, "
                                      f"{refusal.get('at')}); rebuild with: {BUILD_HINT.format(bundle=bundle.root)} "
                                      "--force")
    problem = cache.writable_reason()
    if problem:
        raise BackendUnavailableError(f"no usable engine for this device and {problem}; build one with: "
                                      + BUILD_HINT.format(bundle=bundle.root))
    with cache.locked(key, options.build_keepalive):
        if not force and (found := cache.lookup(key)) is not None:  # built by another process meanwhile
            return found[0], found[1], "cache"
        if force:
            cache.forget_refusal(key)
            cache.forget_refusal(engine_key(trt, bundle.root, settings, device, fp32=True)[0])
        path, manifest = build_checked_engine(trt, bundle.root, settings, cache, key, onnx_path, typing,
                                              options.build_keepalive, earlier=earlier)
    return path, manifest, "built"


def load_engine_predictor(bundle: Bundle, options: BackendOptions | None = None) -> TensorRTPredictor:
    """The bundle's FP16 engine for this device as a predictor (found, or built and parity-checked)."""
    options = options or BackendOptions()
    trt = import_tensorrt()
    path, manifest, where = ensure_engine(bundle, options, trt=trt)
    log.info("TensorRT engine from %s: %s (built %s)", where, path, manifest.get("created", "?"))
    return TensorRTPredictor(trt, path.read_bytes(), model_path=str(path), dla_core=options.dla_core,
                             cuda_graph=options.cuda_graph, precision=str(manifest.get("precision") or "fp16"))


__all__ = ["BUILD_HINT", "TensorRTPredictor", "build_checked_engine", "cuda_device", "cuda_device_identity",
           "engine_key", "ensure_engine",
           "import_tensorrt", "load_engine_predictor", "parity_gate", "tensorrt_unavailable_reason"]
