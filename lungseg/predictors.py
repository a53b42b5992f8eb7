"""Inference backends behind one interface, a start-up self-test, and demotion at run time.

The chain, best first: TensorRT FP16 engine -> onnxruntime CUDA -> OpenVINO CPU int8 / Intel GPU / Intel
NPU / CPU bf16 / CPU fp32 (the ``[openvino]`` extra, :mod:`lungseg.openvino_runtime`; the GPU and NPU
only where OpenVINO finds them) -> onnxruntime CPU int8 -> onnxruntime CPU fp32. At start-up each
candidate is built and run on the bundle's golden set (:mod:`lungseg.selftest`); the first that passes
serves. Where OpenVINO is installed, the CPU candidates are instead all self-tested and timed on the
golden set, and the fastest that passes serves (``BackendOptions.cpu_choice``: ``fastest``, ``chain`` or
one candidate pinned first). If it later fails while running (a CUDA error, a lost GPU),
:class:`FallbackPredictor` moves to the next candidate that passes its self-test and runs the same batch
again, so no input is lost to a backend fault. Every choice, failure and demotion is logged with its
reason; a session that silently lost its GPU provider is reported as CPU, never as CUDA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.atomic import atomic_write
from lungseg.backend_api import BackendOptions, BackendRuntimeError, BackendUnavailableError, Predictor
from lungseg.bundle import INPUT_NAME, ONNX_FP32, ONNX_INT8, Bundle
from lungseg.openvino_runtime import (
    OPENVINO_INT8_XML,
    accelerator_devices,
    load_openvino,
    load_openvino_device,
    openvino_installed,
)
from lungseg.preprocess import CHANNELS, INPUT_SIZE
from lungseg.selftest import GoldenSetError, load_golden, run_selftest
from lungseg.tensorrt_runtime import load_engine_predictor

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "cuda", "cpu", "openvino")
# the int8 IR on an Intel GPU / NPU, where OpenVINO finds one (candidate name -> OpenVINO device)
OPENVINO_DEVICE_CANDIDATES = {"openvino-gpu": "GPU", "openvino-npu": "NPU"}
OPENVINO_CANDIDATES = ("openvino-int8", *OPENVINO_DEVICE_CANDIDATES, "openvino-bf16", "openvino-fp32")
# the candidates measured against each other at start-up: the CPU ones and OpenVINO's accelerators beside it
CPU_CANDIDATES = (*OPENVINO_CANDIDATES, "cpu-int8", "cpu-fp32")
CHAINS = {
    "auto": ("tensorrt", "cuda", *CPU_CANDIDATES),
    "tensorrt": ("tensorrt",),
    "cuda": ("cuda",),
    "cpu": CPU_CANDIDATES,
    "openvino": OPENVINO_CANDIDATES,
}
# BackendOptions.cpu_choice: measure and serve the fastest CPU candidate, keep the chain's order, or pin one first
CPU_CHOICES = ("fastest", "chain", *CPU_CANDIDATES)
TIMED_RUNS = 2  # start-up timing of each CPU candidate: the best of this many batch-1 runs on a golden image
CUDNN_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
# onnxruntime session config entries for int8 CPU sessions. Empty on purpose: the export's 7-bit
# (reduce-range) weights cannot saturate u8xs8 kernels on any CPU, and "session.x64quantprecision"
# (u8u8 kernels on x64 without VNNI) measured slower without changing the masks; an int8 model
# that does saturate on some CPU fails its start-up self-test there and fp32 serves instead.
INT8_SESSION_CONFIG: dict[str, str] = {}


def _installed(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cuda_provider_problem(available: list[str]) -> str | None:
    """Why onnxruntime has no CUDA provider here, in words an installer can act on (``None`` if it has one)."""
    if "CUDAExecutionProvider" in available:
        return None
    cpu, gpu = _installed("onnxruntime"), _installed("onnxruntime-gpu")
    if cpu and gpu:
        return (f"both onnxruntime {cpu} (CPU only) and onnxruntime-gpu {gpu} are installed and the CPU package "
                "shadows the GPU one: pip uninstall -y onnxruntime onnxruntime-gpu && "
                "pip install 'onnxruntime-gpu>=1.19' (see packaging/INSTALL.md)")
    if not gpu:
        return f"onnxruntime {cpu or '?'} is the CPU-only package; install onnxruntime-gpu instead (never both)"
    return (f"onnxruntime-gpu {gpu} is installed but offers only {available}: its CUDA/cuDNN libraries did not "
            "load (check the CUDA 12 runtime and cuDNN 9 are installed, see packaging/INSTALL.md)")


def preload_cuda_libraries(ort: Any) -> None:
    """Load the CUDA 12 / cuDNN 9 libraries of the ``nvidia-*`` pip wheels (``onnxruntime-gpu[cuda,cudnn]``) before
    the CUDA provider looks for them (onnxruntime >= 1.21; without it those wheels are not found). Missing
    libraries are not an error here: the session then comes up without CUDA and the caller says so."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload(cuda=True, cudnn=True, msvc=False)
    except Exception as exc:  # an OSError per missing library, or anything a broken install raises
        log.info("onnxruntime.preload_dlls: %s (the CUDA provider may still find system libraries)", exc)


class OnnxRuntimePredictor:
    """An onnxruntime session on the CPU or CUDA execution provider."""

    def __init__(self, model_path: str, device: str = "cpu", threads: int | None = None,
                 options: BackendOptions | None = None):
        import onnxruntime as ort

        options = options or BackendOptions(threads=threads)
        name = os.path.basename(model_path)
        self.precision = "fp16" if ".fp16." in name else ("int8" if ".int8." in name else "fp32")
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads or options.threads:
            session_options.intra_op_num_threads = threads or options.threads
        session_options.log_severity_level = 3
        # idle threads sleep instead of spinning after each run: on a 2-core box the spinning thread
        # took the core that the decode worker and the writer need
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.precision == "int8":
            for key, value in INT8_SESSION_CONFIG.items():
                session_options.add_session_config_entry(key, value)
        providers: list[Any] = ["CPUExecutionProvider"]
        if device == "cuda":
            preload_cuda_libraries(ort)
            problem = cuda_provider_problem(ort.get_available_providers())
            if problem:
                raise BackendUnavailableError(problem)
            if options.cudnn_conv_algo_search not in CUDNN_SEARCH:
                raise ValueError(f"cudnn_conv_algo_search must be one of {CUDNN_SEARCH}")
            cuda: dict[str, Any] = {"device_id": 0, "cudnn_conv_algo_search": options.cudnn_conv_algo_search}
            if options.gpu_mem_limit_mb:
                cuda["gpu_mem_limit"] = int(options.gpu_mem_limit_mb) << 20
            providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(model_path, session_options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
            raise BackendUnavailableError(f"{name}: onnxruntime could not load it ({exc})") from exc
        actual = self.session.get_providers()
        if device == "cuda" and actual[0] != "CUDAExecutionProvider":
            raise BackendUnavailableError(f"CUDA provider failed to initialise (session has {actual})")
        self.backend = "cuda" if device == "cuda" else "cpu"
        self.providers = actual
        self.model_path = model_path
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return out[:, 0].astype(np.float32, copy=False)


Factory = Callable[[], Predictor]


def candidates(bundle: Bundle, backend: str, options: BackendOptions) -> list[tuple[str, Factory]]:
    """The ``(name, factory)`` chain for ``backend`` (see :data:`CHAINS`), skipping files the bundle lacks.

    The OpenVINO candidates appear only where the ``openvino`` package is installed (found without importing
    it) and the bundle was exported for OpenVINO (it has ``model.openvino.int8.xml``, parity-checked at export),
    or OpenVINO is asked for by name (``backend="openvino"`` or a pinned ``cpu_choice``); elsewhere the chain is
    the onnxruntime one. ``openvino-gpu`` / ``openvino-npu`` join only where OpenVINO lists that device (or
    when pinned, which then fails with the reason where it is absent). A ``cpu_choice`` naming a CPU candidate
    moves it to the front of the CPU candidates.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if options.cpu_choice not in CPU_CHOICES:
        raise ValueError(f"unknown cpu_choice {options.cpu_choice!r}; choose from {CPU_CHOICES}")
    int8 = bundle.variant(ONNX_INT8) if bundle.onnx.name == ONNX_FP32 else None
    asked = backend == "openvino" or options.cpu_choice in OPENVINO_CANDIDATES
    with_openvino = openvino_installed() and (asked or bundle.variant(OPENVINO_INT8_XML) is not None)
    names = list(CHAINS[backend])
    if options.cpu_choice in names:
        names.remove(options.cpu_choice)
        first_cpu = next((i for i, n in enumerate(names) if n in CPU_CANDIDATES), len(names))
        names.insert(first_cpu, options.cpu_choice)
    chain: list[tuple[str, Factory]] = []
    devices: list[str] | None = None  # listed once, and only where OpenVINO serves
    for name in names:
        if name in OPENVINO_CANDIDATES:
            if not with_openvino:
                if asked:
                    raise BackendUnavailableError("openvino is not installed: pip install 'lungseg[openvino]'")
                continue
            int8_ir = bundle.variant(OPENVINO_INT8_XML) is not None
            if name in OPENVINO_DEVICE_CANDIDATES:
                device = OPENVINO_DEVICE_CANDIDATES[name]
                if name != options.cpu_choice:
                    if not int8_ir:
                        continue
                    devices = accelerator_devices() if devices is None else devices
                    if device not in devices:
                        continue
                chain.append((name, _openvino_device_factory(bundle, device, options)))
                continue
            if name == "openvino-int8" and not int8_ir:
                continue
            chain.append((name, _openvino_factory(bundle, name.split("-")[1], options)))
        elif name == "tensorrt":
            chain.append((name, lambda: load_engine_predictor(bundle, options)))
        elif name == "cuda":
            chain.append((name, lambda: OnnxRuntimePredictor(str(bundle.onnx), device="cuda", options=options)))
        elif name == "cpu-int8":
            if int8 is not None:
                chain.append((name, lambda: OnnxRuntimePredictor(str(int8), device="cpu", options=options)))
        else:
            chain.append((name, lambda: OnnxRuntimePredictor(str(bundle.onnx), device="cpu", options=options)))
    return chain


def _openvino_factory(bundle: Bundle, precision: str, options: BackendOptions) -> Factory:
    return lambda: load_openvino(bundle, precision, options)


def _openvino_device_factory(bundle: Bundle, device: str, options: BackendOptions) -> Factory:
    return lambda: load_openvino_device(bundle, device, options)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class FallbackPredictor:
    """The serving predictor: the first candidate that loads and passes its self-test, demoted on failure.

    ``backend``/``precision``/``model_path`` always describe the predictor in use now.
    ``status()`` is what the sidecar and ``lungseg-edge status`` show.
    """

    def __init__(self, chain: list[tuple[str, Factory]], bundle_root: Path, *, selftest: bool = True,
                 measure_cpu: bool = False):
        self._pending = list(chain)
        self._failed: set[str] = set()  # candidates demoted at run time
        self._promotion: tuple[list[_Timed], dict[str, Any], list[str]] | None = None
        self._measuring: threading.Thread | None = None
        self._measure_cpu = measure_cpu
        self.choice: dict[str, Any] = {"by": "chain order"}
        self._root = bundle_root
        self._selftest = selftest
        self._golden: Any = None
        self._golden_problem: str | None = None
        self._listeners: list[Callable[[FallbackPredictor], None]] = []
        self.current: Predictor | None = None
        self.current_name = ""
        self.fallbacks: list[str] = []
        self.selftests: list[dict[str, Any]] = []
        self.selftest: dict[str, Any] | None = None
        self.demotions: list[dict[str, Any]] = []
        self._advance()

    # --- choosing ------------------------------------------------------------
    def _golden_set(self) -> Any:
        if self._golden is None and self._golden_problem is None:
            try:
                self._golden = load_golden(self._root)
            except GoldenSetError as exc:
                self._golden_problem = str(exc)
        return self._golden

    def _check(self, name: str, predictor: Predictor) -> tuple[bool, str, dict[str, Any]]:
        if not self._selftest:
            return True, "", {"backend": predictor.backend, "precision": predictor.precision, "passed": None,
                              "reason": "self-test disabled"}
        golden = self._golden_set()
        if golden is None:
            record = {"backend": predictor.backend, "precision": predictor.precision, "passed": None,
                      "reason": f"no golden set ({self._golden_problem})"}
            if name == "cpu-fp32" or (name == "cuda" and predictor.precision == "fp32"):
                return True, "", record  # the reference precision runs unchecked on an old bundle
            return False, f"cannot be self-tested: {self._golden_problem}", record
        # the CPU fp32 model computes what the reference computed: two images prove the file is the right
        # one; every reduced precision and every GPU backend runs the whole golden set
        result = run_selftest(predictor, golden, limit=2 if name == "cpu-fp32" else None)
        return result.passed, result.summary(), {**result.to_dict(), "golden_sha256": golden.sha256[:16]}

    def _load(self, name: str, factory: Factory, errors: list[str]) -> Predictor | None:
        try:
            return factory()
        except BackendUnavailableError as exc:
            errors.append(f"{name}: {exc}")
            log.warning("backend %s unavailable: %s", name, exc)
        except Exception as exc:  # a GPU library failing in an unexpected way must not stop the service
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            log.warning("backend %s failed to start: %s: %s", name, type(exc).__name__, exc)
        return None

    def _tested(self, name: str, predictor: Predictor, errors: list[str]) -> tuple[bool, str, dict[str, Any]]:
        passed, summary, record = self._check(name, predictor)
        record = {"candidate": name, "at": _now(), **record}
        self.selftests.append(record)
        if not passed:
            errors.append(f"{name}: self-test failed: {summary}")
            log.warning("self-test failed, not using %s: %s", name, summary,
                        extra={"event": "selftest_failed", "backend": name})
            _close(predictor)
        return passed, summary, record

    def _measure(self, cpu: list[tuple[str, Factory]], errors: list[str]) -> list[_Timed]:
        """Load, self-test and time each of ``cpu``: those that pass, fastest first, only the fastest left open."""
        golden = self._golden_set()
        # only the fastest so far stays open (a session each would add up: five candidates held at once
        # were ~250 MiB more RSS); the others are rebuilt only if they are demoted to
        timed: list[_Timed] = []
        for name, factory in cpu:
            predictor = self._load(name, factory, errors)
            if predictor is None:
                continue
            passed, summary, record = self._tested(name, predictor, errors)
            if not passed:
                continue
            try:
                ms = _ms_per_image(predictor, golden.inputs[:1])
            except Exception as exc:  # it passed a moment ago; a failure now disqualifies it all the same
                errors.append(f"{name}: failed its timed run: {type(exc).__name__}: {exc}")
                _close(predictor)
                continue
            best = min((t for t in timed if t[3] is not None), key=lambda t: t[0], default=None)
            if best is not None and best[0] <= ms:
                _close(predictor)
                timed.append((ms, name, factory, None, summary, record))
            else:
                if best is not None:
                    _close(best[3])
                    timed[timed.index(best)] = (*best[:3], None, *best[4:])
                timed.append((ms, name, factory, predictor, summary, record))
        timed.sort(key=lambda t: t[0])
        if timed and timed[0][3] is None:  # cannot happen: the fastest is the one left open
            raise RuntimeError("the fastest CPU candidate was closed")
        return timed

    @staticmethod
    def _choice(timed: list[_Timed], cpu: list[tuple[str, Factory]], by: str) -> dict[str, Any]:
        ms, name = timed[0][0], timed[0][1]
        timings = {n: round(t, 2) for t, n, _, _, _, _ in timed}
        runner_up = f"; next {timed[1][1]} at {timed[1][0]:.1f} ms" if len(timed) > 1 else ""
        return {"by": by, "chosen": name, "ms_per_image_b1": timings,
                "not_passed": [c for c, _ in cpu if c not in timings],
                "reason": f"fastest of {len(timed)} CPU candidates that passed the self-test: {name} at "
                          f"{ms:.1f} ms/image (batch 1, best of {TIMED_RUNS}){runner_up}"}

    def _fastest_cpu(self, errors: list[str]) -> tuple[str, Predictor, str, dict[str, Any]] | None:
        """Self-test and time every CPU candidate at the head of the chain; the fastest that passes, or ``None``.

        The others stay behind it in the chain, fastest first, for demotion (rebuilt and re-tested then).
        """
        cpu: list[tuple[str, Factory]] = []
        while self._pending and self._pending[0][0] in CPU_CANDIDATES:
            cpu.append(self._pending.pop(0))
        timed = self._measure(cpu, errors)
        if not timed:
            return None
        _, name, _, predictor, summary, record = timed[0]
        assert predictor is not None
        self._pending = [(n, f) for _, n, f, _, _, _ in timed[1:]] + self._pending
        self.choice = self._choice(timed, cpu, "measurement")
        log.warning("CPU backend chosen by measurement: %s", self.choice["reason"],
                    extra={"event": "backend_measured", "backend": name})
        return name, predictor, summary, record

    # --- measuring after start-up ---------------------------------------------
    def measure_in_background(self, cpu: list[tuple[str, Factory]], cache: Path | None) -> threading.Thread:
        """Serve what the chain gave now; self-test and time ``cpu`` (every CPU candidate) on a thread, and
        switch to the fastest at the next :meth:`predict` (on the serving thread, so a file's outputs always
        name the backend that segmented it). The measurement is kept in ``cache`` for the next start."""
        self.choice = {"by": "chain order (measuring the CPU candidates in the background)"}

        def run() -> None:
            errors: list[str] = []
            try:
                timed = self._measure(cpu, errors)
            except Exception as exc:  # never the service's problem: it keeps the chain's choice
                log.warning("background CPU measurement failed: %s: %s", type(exc).__name__, exc)
                return
            if not timed:
                return
            choice = self._choice(timed, cpu, "measurement (in the background)")
            if cache is not None:
                _write_choice(cache, {**choice, "by": "measurement"})
            log.warning("CPU candidates measured in the background: %s (serving it from the next image)",
                        choice["reason"], extra={"event": "backend_measured_background", "backend": choice["chosen"]})
            self._promotion = timed, choice, errors

        thread = threading.Thread(target=run, name="lungseg-cpu-measure", daemon=True)
        thread.start()
        self._measuring = thread
        return thread

    def _promote(self) -> None:
        """Apply a finished background measurement: the fastest serves, the rest follow in measured order."""
        promotion, self._promotion = self._promotion, None
        if promotion is None:
            return
        timed, choice, errors = promotion
        _, name, _, fastest, _, record = timed[0]
        self.choice = choice
        self.fallbacks.extend(e for e in errors if e not in self.fallbacks)  # candidates that failed to load/test
        if name == self.current_name or name in self._failed or fastest is None:
            _close(fastest)
        else:
            old, self.current, self.current_name, self.selftest = self.current, fastest, name, record
            _close(old)
            log.warning("CPU backend switched after measuring: %s", choice["reason"],
                        extra={"event": "backend_measured", "backend": name})
            for listener in self._listeners:
                listener(self)
        ranked = [(n, f) for _, n, f, _, _, _ in timed if n != self.current_name and n not in self._failed]
        self._pending = ranked + [(n, f) for n, f in self._pending if n not in CPU_CANDIDATES]

    def _advance(self, failure: str | None = None) -> None:
        old, old_name = self.current, self.current_name
        errors: list[str] = []
        while self._pending:
            if (old is None and self._measure_cpu and self._selftest and self._pending[0][0] in CPU_CANDIDATES
                    and self._golden_set() is not None):
                fastest = self._fastest_cpu(errors)
                if fastest is None:
                    continue
                name, predictor, summary, record = fastest
            else:
                name, factory = self._pending.pop(0)
                loaded = self._load(name, factory, errors)
                if loaded is None:
                    continue
                predictor = loaded
                passed, summary, record = self._tested(name, predictor, errors)
                if not passed:
                    continue
            if summary:
                log.warning("self-test passed: %s", summary, extra={"event": "selftest_passed", "backend": name})
            self.current, self.current_name, self.selftest = predictor, name, record
            self.fallbacks.extend(errors)
            if old is not None:
                self._failed.add(old_name)
                self.demotions.append({"at": _now(), "from": getattr(old, "backend", "?"),
                                       "from_precision": getattr(old, "precision", "?"), "to": predictor.backend,
                                       "to_precision": predictor.precision, "reason": failure or "",
                                       "skipped": errors})
                log.error("backend demoted to %s (%s) after: %s", predictor.backend, predictor.precision, failure,
                          extra={"event": "backend_demoted", "backend": predictor.backend,
                                 "precision": predictor.precision})
                _close(old)
            for listener in self._listeners:
                listener(self)
            return
        self.fallbacks.extend(errors)
        raise BackendUnavailableError("; ".join(errors) or "no backend left to try")

    # --- serving -------------------------------------------------------------
    @property
    def backend(self) -> str:
        return str(getattr(self.current, "backend", "none"))

    @property
    def precision(self) -> str:
        return str(getattr(self.current, "precision", "none"))

    @property
    def model_path(self) -> str:
        return str(getattr(self.current, "model_path", ""))

    def on_change(self, listener: Callable[[FallbackPredictor], None]) -> None:
        """Call ``listener(self)`` after every demotion."""
        self._listeners.append(listener)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        shape = getattr(batch, "shape", ())
        if len(shape) != 4 or tuple(shape[1:]) != (CHANNELS, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"model input must be (N, {CHANNELS}, {INPUT_SIZE}, {INPUT_SIZE}), got {shape}")
        if self._promotion is not None:  # a background measurement finished: the fastest serves from now on
            self._promote()
        while True:
            assert self.current is not None
            try:
                return self.current.predict(batch)
            except (ValueError, TypeError):
                raise  # the input is wrong, not the backend
            except Exception as exc:
                if not self._pending:
                    raise
                failure = f"{self.backend}/{self.precision} failed while running: {type(exc).__name__}: {exc}"
                log.error("%s; demoting", failure, extra={"event": "backend_failed", "backend": self.backend})
                self._advance(failure)

    def status(self) -> dict[str, Any]:
        """JSON-friendly: backend in use, its self-test, the fallbacks at start and the demotions since."""
        return {"backend": self.backend, "precision": self.precision,
                "device": str(getattr(self.current, "device", "")) or _device(self.backend),
                "isa": getattr(self.current, "isa", None), "choice": self.choice,
                "model_file": Path(self.model_path).name, "selftest": self.selftest,
                "fallbacks": list(self.fallbacks), "demotions": list(self.demotions),
                "remaining": [name for name, _ in self._pending], "updated": _now()}


def _device(backend: str) -> str:
    return "GPU" if backend in ("tensorrt", "cuda") else ("none" if backend == "none" else "CPU")


def _ms_per_image(predictor: Predictor, image: np.ndarray, runs: int = TIMED_RUNS) -> float:
    """Best of ``runs`` timed batch-1 runs on ``image`` (1, 3, S, S), in ms (the self-test warmed it up)."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        predictor.predict(image)
        best = min(best, (time.perf_counter() - start) * 1000)
    return best


def _choice_cache(bundle: Bundle, options: BackendOptions, candidates_measured: list[str]) -> Path | None:
    """``<engine cache>/cpu-choice-<key>.json``: key = bundle, CPU, runtime versions, threads and the candidates
    measured (an Intel GPU or NPU that appears or goes away is a new measurement)."""
    if options.engine_cache is None:
        return None
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = "".join(line for line in fh if line.startswith(("model name", "flags")))[:4000]
    except OSError:
        cpu = platform.processor()
    key = "|".join([bundle.sha256, cpu, str(os.cpu_count()), str(options.threads), str(_installed("onnxruntime")),
                    str(_installed("openvino")), ",".join(candidates_measured)])
    return Path(options.engine_cache) / f"cpu-choice-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _read_choice(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(value, dict) and isinstance(value.get("ms_per_image_b1"), dict)
    return value if ok else None


def _write_choice(path: Path, choice: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({**choice, "measured_at": _now()}, indent=2) + "\n")
    except OSError as exc:
        log.warning("could not keep the CPU backend measurement in %s: %s", path.parent, exc)


def _close(predictor: Any) -> None:
    close = getattr(predictor, "close", None)
    if callable(close):
        try:
            close()
        except Exception as exc:  # releasing a broken GPU context may fail too; nothing more to do
            log.warning("could not release %s cleanly: %s", getattr(predictor, "backend", "?"), exc)


# a measured CPU candidate: (ms per image, name, factory, its predictor if left open, self-test summary, record)
_Timed = tuple[float, str, Factory, "Predictor | None", str, dict[str, Any]]


@dataclass
class Selection:
    """The predictor chosen at start-up and why the better ones were not."""

    predictor: FallbackPredictor
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0


def select_predictor(bundle: Bundle, backend: str = "auto", threads: int | None = None,
                     options: BackendOptions | None = None) -> Selection:
    """Choose a backend along :data:`CHAINS` [``backend``], self-testing each candidate.

    ``cpu`` means int8 when its self-test passes, else fp32. An explicit GPU backend that
    cannot run (or fails its self-test) raises :class:`BackendUnavailableError`.
    """
    options = options or BackendOptions(threads=threads)
    if threads and not options.threads:
        options = BackendOptions(**{**options.__dict__, "threads": threads})
    start = time.perf_counter()
    chain = candidates(bundle, backend, options)
    measure = options.cpu_choice == "fastest" and any(name in OPENVINO_CANDIDATES for name, _ in chain)
    cache = _choice_cache(bundle, options, [n for n, _ in chain if n in CPU_CANDIDATES]) if measure else None
    cached = _read_choice(cache) if cache is not None else None
    if cached is not None:  # measured here before, same bundle, CPU and runtimes: that ranking, first that passes
        order = {name: i for i, name in enumerate(cached["ms_per_image_b1"])}
        chain = sorted(chain, key=lambda c: (c[0] in CPU_CANDIDATES, order.get(c[0], len(order))))
    later = measure and cached is None and options.measure_in_background and options.selftest
    predictor = FallbackPredictor(chain, bundle.root, selftest=options.selftest,
                                  measure_cpu=measure and cached is None and not later)
    if later and predictor.current_name in CPU_CANDIDATES:
        predictor.measure_in_background([c for c in chain if c[0] in CPU_CANDIDATES], cache)
    if cached is not None:
        predictor.choice = {**cached, "by": "measurement (cached)", "cache": cache.name if cache else None}
        if predictor.current_name != cached.get("chosen"):
            predictor.choice.update(chosen=predictor.current_name, reason=(
                f"{cached.get('chosen')} was measured fastest but is not usable now; next in the measured ranking"))
    elif predictor.choice.get("by") == "measurement" and cache is not None:
        _write_choice(cache, predictor.choice)
    seconds = time.perf_counter() - start
    log.warning(
        "inference backend: %s (%s, %s) chosen in %.2f s%s", predictor.backend, predictor.precision,
        Path(predictor.model_path).name, seconds,
        f"; fell back because {'; '.join(predictor.fallbacks)}" if predictor.fallbacks else "",
    )
    return Selection(predictor, list(predictor.fallbacks), seconds)


__all__ = ["BACKENDS", "CHAINS", "CPU_CANDIDATES", "CPU_CHOICES", "INPUT_NAME", "INT8_SESSION_CONFIG",
           "OPENVINO_CANDIDATES", "OPENVINO_DEVICE_CANDIDATES", "BackendOptions", "BackendRuntimeError",
           "BackendUnavailableError", "FallbackPredictor", "OnnxRuntimePredictor", "Predictor", "Selection",
           "candidates", "cuda_provider_problem", "preload_cuda_libraries", "select_predictor"]
