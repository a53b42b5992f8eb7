"""Build a TensorRT FP16 engine from a bundle's ONNX file (TensorRT 8.6 and 10.x Python API).

Needs ``tensorrt`` and a CUDA GPU, nothing else (no torch, no onnx), so the device
that runs the engine builds it: this is device code of the core, used by the runtime
(:mod:`lungseg.tensorrt_runtime`) and by ``lungseg-export``. The steps:

* refuse TensorRT older than 8.6 (JetPack 5's 8.5 cannot parse this model's ONNX
  reliably and is not supported) with a message saying so;
* ``Builder(logger).create_network(flags)``: ``EXPLICIT_BATCH`` whenever the flag
  exists (8.6 requires it for ONNX; 10.x ignores it), plus ``STRONGLY_TYPED`` when
  the TensorRT has it and the bundle has ``model.fp16.onnx``: the fp16 graph then
  decides every layer's precision (its Sigmoid and output stay fp32). Otherwise
  (8.6, or a DLA build) the fp32 ONNX with ``BuilderFlag.FP16`` and
  ``OBEY_PRECISION_CONSTRAINTS``, the Sigmoid and output layers pinned to fp32;
* ``OnnxParser.parse_from_file``, parser errors in the exception;
* one optimisation profile for the dynamic batch (min/opt/max), the workspace
  limit, an optional DLA core with GPU fallback, a timing cache;
* ``IProgressMonitor`` progress in the log where TensorRT has it, and a caller's keep-alive
  callback every few seconds while building (the edge service passes systemd's
  ``EXTEND_TIMEOUT_USEC``: a build on an Orin Nano takes minutes);
* ``build_serialized_network``; a ``None`` result raises with the errors TensorRT
  logged (the log goes to :mod:`logging`, never to stderr as plain text).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lungseg.bundle import INPUT_NAME, ONNX_FP16, ONNX_FP32
from lungseg.errors import LungsegError
from lungseg.preprocess import CHANNELS, INPUT_SIZE

log = logging.getLogger(__name__)

DEFAULT_PROFILE = (1, 1, 8)
DEFAULT_WORKSPACE_MB = 1024
MIN_TENSORRT = (8, 6)
TESTED_BELOW = (11, 0)
EXTEND_EVERY_S = 20.0


class EngineBuildError(LungsegError, RuntimeError):
    """TensorRT could not parse the ONNX file or build the engine; the message says why."""


@dataclass(frozen=True)
class EngineSettings:
    """Build settings; part of the engine cache key, so a change means a rebuild."""

    profile: tuple[int, int, int] = DEFAULT_PROFILE
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    timing_cache: Path | None = None
    dla_core: int | None = None

    def key_fields(self) -> dict[str, Any]:
        return {"profile": list(self.profile), "workspace_mb": self.workspace_mb, "dla_core": self.dla_core}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "timing_cache": str(self.timing_cache) if self.timing_cache else None}


#: a DLA runs static shapes only (min = opt = max); with a dynamic profile and GPU fallback every layer would
#: silently run on the GPU. One image at a time: the predictor splits larger batches.
DLA_PROFILE = (1, 1, 1)


def parse_profile(text: str) -> tuple[int, int, int]:
    """``"1,1,8"`` -> ``(1, 1, 8)``; MIN is 1 (a batch's last, shorter part must fit), MIN <= OPT <= MAX."""
    try:
        low, opt, high = (int(v) for v in text.split(","))
    except ValueError as exc:
        raise ValueError(f"profile {text!r} is not MIN,OPT,MAX (e.g. 1,1,8)") from exc
    if not 1 <= low <= opt <= high:
        raise ValueError(f"profile {text!r} needs 1 <= MIN <= OPT <= MAX")
    if low != 1:
        raise ValueError(f"profile {text!r}: MIN must be 1 (a batch's last, shorter part runs with fewer images; "
                         "an engine that cannot take it would be demoted)")
    return low, opt, high


def engine_settings(dla_core: int | None = None, **fields: Any) -> EngineSettings:
    """Build settings for a GPU (the default profile) or a DLA core (the static :data:`DLA_PROFILE`)."""
    if dla_core is not None:
        fields["profile"] = DLA_PROFILE
    return EngineSettings(dla_core=dla_core, **fields)


def _report_dla_placement(config: Any, network: Any, core: int) -> dict[str, int]:
    """Log how many of the network's layers the DLA can run (``IBuilderConfig.can_run_on_DLA``); the rest fall
    back to the GPU."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    on_dla = sum(1 for layer in layers if config.can_run_on_DLA(layer))
    gpu = [layer.name for layer in layers if not config.can_run_on_DLA(layer)]
    log.warning("DLA core %d: %d of %d layers run on the DLA, %d on the GPU%s", core, on_dla, len(layers), len(gpu),
                f" ({', '.join(gpu[:5])}{', ...' if len(gpu) > 5 else ''})" if gpu else "",
                extra={"event": "dla_placement", "dla_layers": on_dla, "gpu_layers": len(gpu)})
    return {"dla": on_dla, "gpu": len(gpu)}


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def supported_reason(trt: ModuleType) -> str | None:
    """Why this TensorRT cannot be used (``None``: it can)."""
    version = version_tuple(getattr(trt, "__version__", "0"))
    if version[:2] < MIN_TENSORRT:
        return (f"TensorRT {trt.__version__} is older than 8.6, which lungseg needs (JetPack 5 is not supported; "
                "use JetPack 6.x, or run on the CPU with --backend cpu)")
    if version[:2] >= TESTED_BELOW:
        log.warning("TensorRT %s is newer than the tested 8.6-10.x; building strongly typed", trt.__version__)
    return None


_PROCESS_LOGGER: list[tuple[ModuleType, Any]] = []  # (tensorrt module, its one logger) once made
_LOGGER_LOCK = threading.Lock()


def make_logger(trt: ModuleType) -> Any:
    """The process's one ``trt.ILogger``, forwarding to :mod:`logging` (logger ``lungseg.tensorrt``).

    TensorRT keeps a single logger pointer per process: a different logger passed to a later Builder or Runtime
    is ignored while the first one's objects exist (NVIDIA/TensorRT#1475), so every caller gets this same one and
    reads the errors of its own step with ``errors_since(mark())``.
    """
    with _LOGGER_LOCK:
        if _PROCESS_LOGGER and _PROCESS_LOGGER[0][0] is trt:
            return _PROCESS_LOGGER[0][1]
        severity = trt.ILogger.Severity
        levels = {severity.INTERNAL_ERROR: logging.CRITICAL, severity.ERROR: logging.ERROR,
                  severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG, severity.VERBOSE: logging.DEBUG}
        errors_at = {severity.INTERNAL_ERROR, severity.ERROR}
        trt_log = logging.getLogger("lungseg.tensorrt")

        class LoggingTrtLogger(trt.ILogger):  # type: ignore[name-defined]  # a class of the runtime-loaded module
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self._errors: deque[tuple[int, str]] = deque(maxlen=200)
                self._count = 0
                self._lock = threading.Lock()

            @property
            def errors(self) -> list[str]:
                return [msg for _, msg in self._errors]

            def mark(self) -> int:
                return self._count

            def errors_since(self, mark: int) -> list[str]:
                return [msg for n, msg in list(self._errors) if n >= mark]

            def log(self, level: Any, msg: str) -> None:
                trt_log.log(levels.get(level, logging.INFO), "%s", msg)
                if level in errors_at:
                    with self._lock:
                        self._errors.append((self._count, str(msg)))
                        self._count += 1

        logger = LoggingTrtLogger()
        _PROCESS_LOGGER[:] = [(trt, logger)]
        return logger


def _progress_monitor(trt: ModuleType) -> Any | None:
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class LoggingProgress(trt.IProgressMonitor):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            log.info("TensorRT build: %s%s (%d steps)", f"{parent_phase} / " if parent_phase else "",
                     phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            log.debug("TensorRT build: %s step %d", phase_name, step)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            log.debug("TensorRT build: %s done", phase_name)

    return LoggingProgress()


Keepalive = Callable[[str], object]
"""Called every few seconds during a build with a status line (e.g. to extend systemd's start timeout)."""


class _KeepCallerWaiting:
    """While building, call the caller's keep-alive every :data:`EXTEND_EVERY_S` seconds."""

    def __init__(self, keepalive: Keepalive | None) -> None:
        self._keepalive = keepalive
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _KeepCallerWaiting:
        if self._keepalive is not None:
            self._thread = threading.Thread(target=self._run, name="trt-build-keepalive", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        assert self._keepalive is not None
        while True:
            try:
                self._keepalive("building the TensorRT engine")
            except Exception as exc:  # a failing keep-alive must never fail the build
                log.debug("build keep-alive failed: %s", exc)
            if self._stop.wait(EXTEND_EVERY_S):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)


def choose_source(trt: ModuleType, bundle_dir: Path, settings: EngineSettings) -> tuple[Path, str]:
    """``(ONNX file, "strong" | "weak")`` for this TensorRT and bundle (see the module docstring)."""
    flags = trt.NetworkDefinitionCreationFlag
    fp16_onnx = bundle_dir / ONNX_FP16
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    if hasattr(flags, "STRONGLY_TYPED") and fp16_onnx.is_file() and (settings.dla_core is None or not has_fp16_flag):
        return fp16_onnx, "strong"
    if not has_fp16_flag:
        raise EngineBuildError(f"TensorRT {trt.__version__} builds only strongly typed networks and the bundle has "
                               f"no {ONNX_FP16}; re-export it with lungseg-export --fp16")
    return bundle_dir / ONNX_FP32, "weak"


def fp32_source(trt: ModuleType, bundle_dir: Path) -> tuple[Path, str]:
    """``(fp32 ONNX, "fp32")``: the engine rebuilt at full precision after an fp16 engine failed its parity check
    (strongly typed where TensorRT has it, else weakly typed without the FP16 flag; TF32 off either way)."""
    return bundle_dir / ONNX_FP32, "fp32"


def _network_flags(trt: ModuleType, typing: str) -> int:
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if hasattr(creation, "EXPLICIT_BATCH"):  # required by 8.6, ignored (deprecated) by 10.x, gone later
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if typing == "strong" or (typing == "fp32" and hasattr(creation, "STRONGLY_TYPED")):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


def _pin_output_precision(trt: ModuleType, network: Any) -> list[str]:
    """Weak typing: keep Sigmoid and the layers producing network outputs in fp32."""
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    pinned = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        produces_output = any(layer.get_output(k).name in outputs for k in range(layer.num_outputs))
        if produces_output or "sigmoid" in layer.name.lower():
            layer.precision = trt.float32
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.float32)
            pinned.append(layer.name)
    return pinned


def _timing_cache(trt: ModuleType, config: Any, path: Path | None) -> None:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        log.warning("timing cache %s does not fit this TensorRT/GPU; starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def build_serialized(trt: ModuleType, onnx_path: Path, typing: str, settings: EngineSettings,
                     keepalive: Keepalive | None = None) -> tuple[bytes, dict]:
    """Parse ``onnx_path`` and build; returns ``(engine bytes, build facts)`` or raises :class:`EngineBuildError`.

    ``keepalive`` is called every :data:`EXTEND_EVERY_S` seconds while TensorRT builds.
    """
    reason = supported_reason(trt)
    if reason:
        raise EngineBuildError(reason)
    if not onnx_path.is_file():
        raise EngineBuildError(f"{onnx_path.name}: not in the bundle (export it first)")
    logger = make_logger(trt)
    mark = logger.mark()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, typing))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = ("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                  or "; ".join(logger.errors_since(mark)))
        raise EngineBuildError(f"{onnx_path.name}: TensorRT {trt.__version__} ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    pinned: list[str] = []
    if typing == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 means fp32 here, not TF32 matmuls
    if typing == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_output_precision(trt, network)
    if settings.dla_core is not None:
        if len(set(settings.profile)) != 1:
            raise EngineBuildError(f"DLA core {settings.dla_core}: the DLA runs static shapes only, not the profile "
                                   f"{settings.profile} (with GPU fallback every layer would run on the GPU)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(settings.dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        _report_dla_placement(config, network, settings.dla_core)
    low, opt, high = settings.profile
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *((n, CHANNELS, INPUT_SIZE, INPUT_SIZE) for n in (low, opt, high)))
    config.add_optimization_profile(profile)
    _timing_cache(trt, config, settings.timing_cache)
    monitor = _progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor
    log.warning("building a TensorRT %s engine (%s typing) from %s; this can take minutes", trt.__version__,
                typing, onnx_path.name)
    with _KeepCallerWaiting(keepalive):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError("TensorRT could not build the engine: " + ("; ".join(logger.errors_since(mark))
                                                                          or "no reason logged"))
    if settings.timing_cache is not None:
        try:
            settings.timing_cache.parent.mkdir(parents=True, exist_ok=True)
            settings.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
        except OSError as exc:
            log.warning("could not save the TensorRT timing cache %s: %s", settings.timing_cache, exc)
    facts = {"precision": "fp32" if typing == "fp32" else "fp16",
             "typing": {"strong": "strong (fp16 ONNX)", "fp32": "fp32 ONNX, no FP16 flag, TF32 off"}.get(
                 typing, "weak (BuilderFlag.FP16, Sigmoid/output pinned to fp32)"), "fp32_layers": pinned,
             "profile": {"input": INPUT_NAME, "min": low, "opt": opt, "max": high},
             "workspace_mb": settings.workspace_mb, "dla_core": settings.dla_core}
    return bytes(serialized), facts


__all__ = ["DEFAULT_PROFILE", "DEFAULT_WORKSPACE_MB", "DLA_PROFILE", "MIN_TENSORRT", "EngineBuildError",
           "EngineSettings", "build_serialized", "choose_source", "engine_settings", "fp32_source", "make_logger",
           "parse_profile", "supported_reason", "version_tuple"]
