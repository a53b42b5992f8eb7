"""An in-process stand-in for the ``tensorrt`` Python module (8.6 or 10.x flavour) that enforces its contracts.

What it holds a caller to, as the real library does:

* 8.x: ``create_network`` without the ``EXPLICIT_BATCH`` bit gives an implicit-batch
  network the ONNX parser rejects; 10.x accepts (and ignores) the bit; ``STRONGLY_TYPED``
  exists from 10.x, and a strongly typed network refuses precision flags at build time
  (no later API is modelled: a version from 11 on is refused, since its API is not known
  from NVIDIA's sources);
* DLA (``default_device_type = DLA`` with ``GPU_FALLBACK``): a layer runs on the DLA only
  with a static profile (min = opt = max), otherwise it falls back to the GPU with a logged
  warning, as TensorRT does; ``can_run_on_DLA`` answers per layer. A DLA engine is
  deserialised by a ``Runtime`` whose ``DLA_core`` is set to the engine's core (what
  NVIDIA's samples do; what the real runtime does when it is left at -1 is not documented,
  so the fake refuses it);
* a custom logger must subclass ``ILogger`` and call ``ILogger.__init__``;
* a dynamic input needs an optimisation profile; the execution context accepts
  only input shapes inside it and needs every tensor address before it runs;
* an engine deserialises only under the TensorRT version and GPU it was built
  for (else ``None`` and an error in the log);
* the ONNX parser refuses opsets above its release's (8.6: 17, 10.x: 20) and operators outside a
  listed subset of the real parser's; an engine's I/O tensors have the types the ONNX declares;
* ``execute_async_v3`` needs a live stream of the fake CUDA runtime and reads and
  writes the fake device memory at the addresses it was given; a context's first
  enqueue may not happen inside a CUDA graph capture (TensorRT allocates then).

The engine computes with the real onnxruntime on the parsed ONNX file, rounding
its output to fp16 for an fp16 engine (a strongly typed network from an fp16 ONNX, or the FP16
flag), so parity checks measure something real; ``nan_fp16`` makes fp16 engines output NaN; ``TF32``
is on until ``clear_flag``. ``corrupt_output``
inverts the probabilities (an engine that must fail parity); ``fail_build`` makes
the build fail with a logged reason; ``context_fails`` makes
``create_execution_context`` return ``None``.
"""

from __future__ import annotations

import base64
import enum
import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fakes_cuda import FakeCudaRuntime

MAGIC = b"FAKE-TRT-ENGINE\n"


@dataclass
class FakeTensorRT:
    version: str = "10.3.0"
    cuda: FakeCudaRuntime = field(default_factory=FakeCudaRuntime)
    corrupt_output: bool = False
    nan_fp16: bool = False  # fp16 engines output NaN (as reported for some fp16 engines on Orin); fp32 ones are fine
    fail_build: str | None = None
    context_fails: bool = False
    builds: int = 0
    networks: list[Any] = field(default_factory=list)
    monitor_events: list[str] = field(default_factory=list)
    process_logger: Any = None  # the first logger given to a Builder or Runtime of this module (one per process)
    ignored_loggers: int = 0

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def _has_fp16_weights(model: bytes | None) -> bool:
    """Whether an ONNX model holds fp16 initializers (a strongly typed network computes in its own types)."""
    import onnx

    if model is None:
        return False
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load_from_string(model).graph.initializer)


# What the ONNX parser of each TensorRT line accepts, from onnx-tensorrt's README / operators.md of that release:
# 8.6 imports opsets 7-17, 10.0-10.3 up to 20 (later 10.x raise it; not modelled). Only the operators lungseg's
# models (fp32, fp16 with Cast, QDQ int8) and the usual U-Net variants use are listed; the real list is longer,
# so an operator missing here may still be real-importable: the fake then refuses more, never less, than lungseg
# needs to know about.
MAX_OPSET = {8: 17, 10: 20}
KNOWN_OPS = frozenset({"Add", "BatchNormalization", "Cast", "Concat", "Conv", "ConvTranspose", "DequantizeLinear",
                       "Identity", "MaxPool", "Mul", "QuantizeLinear", "Relu", "Resize", "Sigmoid"})


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int, Any]]:
    """Protocol-buffer fields (number, wire type, value) of one message: enough to read ONNX's ModelProto."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, wire, value))
    return out


def onnx_opsets_and_ops(model: bytes) -> tuple[dict[str, int], set[str]]:
    """``({domain: opset}, {op_type})`` of an ONNX ModelProto (opset_import = 8; graph = 7, node = 1, op_type = 4,
    node domain = 7)."""
    opsets: dict[str, int] = {}
    ops: set[str] = set()
    for number, _, value in _fields(model):
        if number == 8:
            entry = {n: v for n, _, v in _fields(value)}
            opsets[bytes(entry.get(1, b"")).decode()] = int(entry.get(2, 0))
        elif number == 7:
            for n, _, node in _fields(value):
                if n == 1:
                    entry = {k: v for k, _, v in _fields(node)}
                    domain = bytes(entry.get(7, b"")).decode()
                    ops.add((domain + "::" if domain else "") + bytes(entry.get(4, b"")).decode())
    return opsets, ops


def make_module(state: FakeTensorRT) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = state.version
    trt.fake = state  # type: ignore[attr-defined]

    class DataType(enum.IntEnum):
        FLOAT = 0
        HALF = 1

    trt.DataType = DataType
    trt.float32, trt.float16 = DataType.FLOAT, DataType.HALF

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self) -> None:
            self._initialised = True

        def log(self, severity: Severity, msg: str) -> None:
            raise NotImplementedError

    ILogger.Severity = Severity  # type: ignore[attr-defined]

    class Logger(ILogger):
        def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
            ILogger.__init__(self)
            self.messages: list[tuple[Severity, str]] = []

        def log(self, severity: Severity, msg: str) -> None:
            self.messages.append((severity, msg))

    trt.ILogger, trt.Logger = ILogger, Logger

    def check_logger(logger: Any) -> ILogger:
        if not isinstance(logger, ILogger) or not getattr(logger, "_initialised", False):
            raise TypeError("tensorrt.ILogger.__init__() must be called when overriding __init__")
        return logger

    # TensorRT keeps one logger pointer per process: a Builder/Runtime given a different logger while one exists
    # warns and uses the existing one (NVIDIA/TensorRT#1475, TensorRT 8.0; NVIDIA said 8.4.1 fixed the *warning*,
    # not that several loggers work). When the real library lets a new logger in after every Builder/Runtime is
    # destroyed is not known from NVIDIA's docs; the fake keeps the first logger for the process (the module).
    state.process_logger = None

    def adopt_logger(logger: Any) -> ILogger:
        logger = check_logger(logger)
        if state.process_logger is None:
            state.process_logger = logger
        elif logger is not state.process_logger:
            state.ignored_loggers += 1
            state.process_logger.log(Severity.WARNING, "The logger passed into createInferBuilder/Runtime differs from "
                                     "one already provided; the existing value will be used instead")
        return state.process_logger

    if state.major >= 11:
        raise ValueError(f"fake TensorRT {state.version}: only the 8.6 and 10.x APIs are modelled")
    flags = {"EXPLICIT_BATCH": 0}
    if state.major >= 10:
        flags["STRONGLY_TYPED"] = 1  # NvInfer.h 10.x: kEXPLICIT_BATCH = 0, kSTRONGLY_TYPED = 1
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", flags) if flags else (
        types.SimpleNamespace())
    builder_flags = {"FP16": 0, "OBEY_PRECISION_CONSTRAINTS": 1, "GPU_FALLBACK": 2, "TF32": 3}
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", builder_flags)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.DeviceType = enum.IntEnum("DeviceType", {"GPU": 0, "DLA": 1})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})

    if state.major >= 10:
        class IProgressMonitor:
            def __init__(self) -> None:
                self._initialised = True

        trt.IProgressMonitor = IProgressMonitor

    class Tensor:
        def __init__(self, name: str):
            self.name = name

    class Layer:
        def __init__(self, name: str, output: str):
            self.name, self.num_outputs = name, 1
            self._outputs = [Tensor(output)]
            # ILayer (NvInfer.h 8.6/10.x): precision, precision_is_set, reset_precision(). What precision reads before
            # it is set is not documented; FLOAT is assumed here (reported by the issue 21 review), so callers must
            # test precision_is_set, never the value. A non-DataType is a TypeError (pybind11 argument check).
            self._precision: Any = DataType.FLOAT
            self.precision_is_set = False
            self.output_types: dict[int, Any] = {}

        @property
        def precision(self) -> Any:
            return self._precision

        @precision.setter
        def precision(self, dtype: Any) -> None:
            if not isinstance(dtype, DataType):
                raise TypeError(f"ILayer.precision: expected tensorrt.DataType, got {type(dtype).__name__}")
            self._precision, self.precision_is_set = dtype, True

        def reset_precision(self) -> None:
            self._precision, self.precision_is_set = DataType.FLOAT, False

        def get_output(self, index: int) -> Tensor:
            return self._outputs[index]

        def set_output_type(self, index: int, dtype: Any) -> None:
            self.output_types[index] = dtype

    class Network:
        def __init__(self, flag_bits: int):
            self.flags = flag_bits
            explicit = "EXPLICIT_BATCH" in flags and flag_bits & (1 << flags["EXPLICIT_BATCH"])
            self.explicit_batch = bool(explicit) or state.major >= 10
            self.strongly_typed = "STRONGLY_TYPED" in flags and bool(flag_bits & (1 << flags["STRONGLY_TYPED"]))
            self.onnx: bytes | None = None
            self.layers = [Layer("/encoder1/Conv", "/encoder1/Relu_output_0"), Layer("/conv/Conv", "logits"),
                           Layer("/Sigmoid", "probability")]
            state.networks.append(self)

        @property
        def num_layers(self) -> int:
            return len(self.layers)

        def get_layer(self, index: int) -> Layer:
            return self.layers[index]

        num_outputs = 1

        def get_output(self, index: int) -> Tensor:
            return Tensor("probability")

    class OnnxParser:
        def __init__(self, network: Network, logger: Any):
            self.network, self.logger, self.errors = network, check_logger(logger), []

        def parse_from_file(self, path: str) -> bool:
            import onnxruntime as ort

            if not self.network.explicit_batch:
                self.errors.append("ModelImporter.cpp: Network must have been created with the explicit batch flag "
                                   "(EXPLICIT_BATCH) to parse ONNX models")
                return False
            try:
                data = open(path, "rb").read()  # noqa: SIM115
                opsets, ops = onnx_opsets_and_ops(data)
                ort.InferenceSession(data, providers=["CPUExecutionProvider"])  # also a well-formed model
            except Exception as exc:
                self.errors.append(f"failed to parse {path}: {exc}")
                return False
            opset, limit = opsets.get("", 0), MAX_OPSET.get(state.major, 17)
            if opset > limit:
                self.errors.append(f"ModelImporter.cpp: this version of TensorRT ({state.version}) supports ONNX "
                                   f"opsets up to {limit}; the model uses opset {opset}")
                return False
            unknown = sorted(ops - KNOWN_OPS)
            if unknown:
                self.errors.append(f"ModelImporter.cpp: No importer registered for op: {unknown[0]}")
                return False
            self.network.onnx = data
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> str:
            return self.errors[index]

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                raise ValueError("profile needs min <= opt <= max")
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self) -> bytes:
            return b"fake-timing-cache"

    class Config:
        def __init__(self) -> None:
            self.flags: set = {trt.BuilderFlag.TF32}  # TensorRT enables TF32 by default
            self.profiles: list[Profile] = []
            self.pool: dict = {}
            self.default_device_type = trt.DeviceType.GPU
            self.DLA_core = -1
            self.progress_monitor: Any = None
            self._cache: TimingCache | None = None

        def set_flag(self, flag: Any) -> None:
            self.flags.add(flag)

        def clear_flag(self, flag: Any) -> None:
            self.flags.discard(flag)

        def set_memory_pool_limit(self, pool: Any, nbytes: int) -> None:
            self.pool[pool] = nbytes

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self._cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self._cache

        def can_run_on_DLA(self, layer: Layer) -> bool:  # noqa: N802 - TensorRT's name
            return not layer.name.startswith("/Sigmoid")  # the fake's DLA has no sigmoid: one layer falls back

    class HostMemory:
        def __init__(self, data: bytes):
            self._data = data

        def __bytes__(self) -> bytes:
            return self._data

    class Builder:
        def __init__(self, logger: Any):
            self.logger = adopt_logger(logger)

        def create_network(self, flag_bits: int = 0) -> Network:
            return Network(flag_bits)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> HostMemory | None:
            error = None
            if network.onnx is None:
                error = "network is empty (nothing parsed)"
            elif network.strongly_typed and config.flags & {getattr(trt.BuilderFlag, "FP16", None)}:
                error = "precision flags (FP16) are not allowed when building a strongly typed network"
            elif not config.profiles or "image" not in config.profiles[0].shapes:
                error = "network has dynamic input 'image' but no optimization profile"
            elif state.fail_build:
                error = state.fail_build
            if error:
                self.logger.log(Severity.ERROR, error)
                return None
            monitor = config.progress_monitor
            if monitor is not None:
                if not getattr(monitor, "_initialised", False):
                    raise TypeError("IProgressMonitor.__init__() must be called")
                monitor.phase_start("Building engine", None, 2)
                for step in range(2):
                    state.monitor_events.append(f"step {step}")
                    if not monitor.step_complete("Building engine", step):
                        self.logger.log(Severity.ERROR, "build cancelled by the progress monitor")
                        return None
                monitor.phase_finish("Building engine")
            dla = config.DLA_core if config.default_device_type == trt.DeviceType.DLA else None
            dla_layers = 0
            if dla is not None:
                low, _, high = config.profiles[0].shapes["image"]
                if trt.BuilderFlag.GPU_FALLBACK not in config.flags:
                    self.logger.log(Severity.ERROR, "DLA: layers the DLA cannot run need GPU_FALLBACK")
                    return None
                if low != high:  # TensorRT: dynamic shapes are not supported on DLA; every layer falls back
                    for layer in network.layers:
                        self.logger.log(Severity.WARNING, f"{layer.name}: DLA does not support dynamic shapes, "
                                        "falling back to GPU")
                else:
                    dla_layers = sum(1 for layer in network.layers if config.can_run_on_DLA(layer))
            state.builds += 1
            props = state.cuda.props[0]
            header = {"version": state.version, "gpu": props.name.decode(), "sm": props.multiProcessorCount,
                      "profile": [list(s) for s in config.profiles[0].shapes["image"]],
                      "fp16": (_has_fp16_weights(network.onnx) if network.strongly_typed
                               else trt.BuilderFlag.FP16 in config.flags),
                      "tf32": trt.BuilderFlag.TF32 in config.flags,
                      "dla": dla, "dla_layers": dla_layers,
                      "onnx": base64.b64encode(network.onnx).decode()}
            return HostMemory(MAGIC + json.dumps(header).encode())

    class Context:
        def __init__(self, engine: Engine):
            self.engine, self.addresses, self.shape = engine, {}, None
            self.ran = False  # a first enqueue happened (outside any capture)

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            low, _, high = self.engine.profile
            if name != "image" or len(shape) != 4 or not all(a <= s <= b for a, s, b in zip(low, shape, high,
                                                                                         strict=True)):
                self.engine.logger.log(Severity.ERROR, f"set_input_shape: {shape} outside the profile {low}..{high}")
                return False
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name: str) -> tuple:
            n = self.shape[0] if self.shape else -1
            return (n, 3, 256, 256) if name == "image" else (n, 1, 256, 256)

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            if not ptr:
                return False
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            if stream_handle not in state.cuda.live_streams:
                self.engine.logger.log(Severity.ERROR, "execute_async_v3: invalid stream handle")
                return False
            if self.shape is None or set(self.addresses) != {"image", "probability"}:
                self.engine.logger.log(Severity.ERROR, "execute_async_v3: input shape or tensor addresses not set")
                return False
            shape = self.shape
            inp, out = self.addresses["image"], self.addresses["probability"]
            if int(stream_handle) in state.cuda.capturing and not self.ran:
                # TensorRT allocates on a context's first enqueue, which a CUDA graph capture cannot record
                self.engine.logger.log(Severity.ERROR, "execute_async_v3: first enqueue of this context inside a "
                                       "CUDA graph capture (run it once before capturing)")
                return False
            self.ran = True

            def run() -> Any:
                from fakes_cuda import cudaError_t

                nbytes = int(np.prod(shape)) * 4
                batch = np.frombuffer(state.cuda.read_device(inp, nbytes), dtype=np.float32).reshape(shape)
                result = self.engine.session.run(None, {"image": batch})[0]
                if self.engine.fp16:
                    result = result.astype(np.float16).astype(np.float32)
                    if state.nan_fp16:
                        result = np.full_like(result, np.nan)
                if state.corrupt_output:
                    result = 1.0 - result
                state.cuda.write_device(out, np.ascontiguousarray(result).tobytes())
                return cudaError_t.cudaSuccess

            return state.cuda.enqueue(stream_handle, run) == 0

    class Engine:
        def __init__(self, header: dict, logger: Any):
            import onnxruntime as ort

            self.logger = logger
            self.fp16 = bool(header["fp16"])
            self.profile = [tuple(s) for s in header["profile"]]
            self.session = ort.InferenceSession(base64.b64decode(header["onnx"]), providers=["CPUExecutionProvider"])
            self.contexts = 0
            # I/O tensors keep the types the ONNX declares (strongly or weakly typed; the FP16 flag changes layers,
            # not I/O), as TensorRT's parser imports them
            declared = {t.name: t.type for t in [*self.session.get_inputs(), *self.session.get_outputs()]}
            self.io_dtypes = {name: {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF}[kind]
                              for name, kind in declared.items()}

        num_io_tensors = 2

        def get_tensor_name(self, index: int) -> str:
            return ("image", "probability")[index]

        def get_tensor_mode(self, name: str) -> Any:
            return {"image": trt.TensorIOMode.INPUT, "probability": trt.TensorIOMode.OUTPUT}.get(
                name, trt.TensorIOMode.NONE)

        def get_tensor_dtype(self, name: str) -> Any:
            return self.io_dtypes[name]

        def get_tensor_shape(self, name: str) -> tuple:
            return (-1, 3, 256, 256) if name == "image" else (-1, 1, 256, 256)

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple]:
            if name != "image" or profile_index != 0:
                raise ValueError(f"no profile {profile_index} for {name}")
            return list(self.profile)

        def create_execution_context(self) -> Context | None:
            if state.context_fails:
                self.logger.log(Severity.ERROR, "out of device memory creating the execution context")
                return None
            self.contexts += 1
            return Context(self)

    class Runtime:
        def __init__(self, logger: Any):
            self.logger = adopt_logger(logger)
            self.DLA_core = -1

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            if not data.startswith(MAGIC):
                self.logger.log(Severity.ERROR, "deserialize: not a serialized engine (magic tag mismatch)")
                return None
            header = json.loads(data[len(MAGIC):])
            props = state.cuda.props[0]
            if header["version"] != state.version:
                self.logger.log(Severity.ERROR, f"engine plan built with TensorRT {header['version']}, this is "
                                f"{state.version}")
                return None
            if header["gpu"] != props.name.decode() or header["sm"] != props.multiProcessorCount:
                self.logger.log(Severity.ERROR, "engine plan was built for a different device")
                return None
            if header.get("dla") is not None and self.DLA_core != header["dla"]:
                self.logger.log(Severity.ERROR, f"engine built for DLA core {header['dla']}; Runtime.DLA_core is "
                                f"{self.DLA_core}")
                return None
            return Engine(header, self.logger)

    trt.Builder, trt.Runtime, trt.OnnxParser = Builder, Runtime, OnnxParser
    return trt


def install(monkeypatch: Any, state: FakeTensorRT, *, front_end: bool = True) -> types.ModuleType:
    """Put the fake TensorRT in ``sys.modules`` as the x86 wheels lay it out.

    ``tensorrt_bindings`` (wheel tensorrt-cu12-bindings) holds the API and ``tensorrt_libs`` (tensorrt-cu12-libs) the
    shared libraries; only the front-end wheel tensorrt-cu12 provides ``import tensorrt`` (``from tensorrt_bindings
    import *``). ``front_end=False`` is an install of bindings and libs alone: ``import tensorrt`` fails.
    """
    module = make_module(state)
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", module)
    monkeypatch.setitem(sys.modules, "tensorrt_libs", types.ModuleType("tensorrt_libs"))
    monkeypatch.setitem(sys.modules, "tensorrt", module if front_end else None)  # None: ImportError on import
    return module
