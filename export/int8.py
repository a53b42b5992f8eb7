"""fp32 ONNX -> static INT8 ONNX for the CPU fallback (onnxruntime quantisation).

Steps: ``onnxruntime.quantization.shape_inference.quant_pre_process`` (shape
inference + graph optimisation), then ``quantize_static`` calibrated on real
radiographs that went through :mod:`lungseg.preprocess`. Defaults: QDQ format,
per-channel int8 weights, uint8 activations (u8s8, the fast path of onnxruntime's
x86 kernels with AVX2/AVX-512 VNNI), MinMax calibration. Options for when parity
or speed fall short: ``reduce_range`` (7-bit weights, for CPUs without VNNI),
QOperator format, per-tensor weights, and keeping the first and last convolution
in fp32 (the input stem and the logit layer are the most sensitive).
onnx and torch are imported only when quantising (this module's options are used
by the on-device ``--engine-only`` path too).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.bundle import INPUT_NAME

from .timing import summary_ms, time_calls

log = logging.getLogger(__name__)

SPEEDUP_TARGET = 1.5
FORMATS = ("qdq", "qoperator")
METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantOptions:
    """How to quantise; the defaults are the ones shipped."""

    quant_format: str = "qdq"
    per_channel: bool = True
    reduce_range: bool = False
    exclude_edge_convs: bool = False
    method: str = "minmax"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Calibration:
    """An onnxruntime ``CalibrationDataReader`` over a preprocessed batch, one image at a time."""

    def __init__(self, batch: np.ndarray):
        self._batch = batch
        self._items: Iterator[dict[str, np.ndarray]] = self._iterate()

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        for image in self._batch:
            yield {INPUT_NAME: image[None].astype(np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def rewind(self) -> None:
        self._items = self._iterate()


def edge_convs(model_path: Path) -> list[str]:
    """Names of the first and the last Conv node (the stem and the logit layer)."""
    import onnx

    convs = [node.name for node in onnx.load(str(model_path)).graph.node if node.op_type == "Conv"]
    return [convs[0], convs[-1]] if convs else []


def quantize_int8(source: Path, target: Path, calibration: np.ndarray, metadata: Mapping[str, str],
                  options: QuantOptions | None = None) -> Path:
    """Write the INT8 variant of ``source`` to ``target``, calibrated on ``(N, 3, S, S)`` inputs."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_export import set_metadata, validate

    options = options or QuantOptions()
    if options.quant_format not in FORMATS or options.method not in METHODS:
        raise ValueError(f"unsupported quantisation options {options}")
    chatter = io.StringIO()  # the histogram calibrators print progress to stdout; keep stdout clean
    with tempfile.TemporaryDirectory(prefix="lungseg-int8-") as tmp, contextlib.redirect_stdout(chatter):
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        excluded = edge_convs(prepared) if options.exclude_edge_convs else []
        quantize_static(
            str(prepared), str(target), _Calibration(calibration),
            quant_format=QuantFormat.QDQ if options.quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[options.method],
        )
    log.debug("onnxruntime quantisation output: %s", chatter.getvalue())
    model = onnx.load(str(target))
    set_metadata(model, {**metadata, "precision": "int8", "quantization": str(options.to_dict()),
                         "calibration_images": str(len(calibration))})
    onnx.save(model, str(target))
    validate(target)
    log.info("wrote %s (int8 %s, calibrated on %d images)", target, options, len(calibration))
    return target


def measure_speedup(fp32_model: Path, int8_model: Path, image: np.ndarray, *, threads: int | None,
                    repeats: int = 10) -> dict[str, Any]:
    """p50 latency of both models on one input with onnxruntime CPU, same threads.

    Runs alternate between the two models, so a machine busy with other work slows both alike.
    """
    from lungseg.predictors import OnnxRuntimePredictor

    predictors = {name: OnnxRuntimePredictor(str(path), device="cpu", threads=threads)
                  for name, path in (("fp32", fp32_model), ("int8", int8_model))}
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for round_ in range(repeats):
        for name, predictor in predictors.items():
            times[name] += time_calls(lambda p=predictor: p.predict(image), repeats=1, warmup=2 if round_ == 0 else 0)
    result: dict[str, Any] = {"device": "cpu", "threads": threads, "batch": int(image.shape[0]),
                              **{name: summary_ms(values) for name, values in times.items()}}
    result["speedup"] = result["fp32"]["p50_ms"] / result["int8"]["p50_ms"]
    result["target"] = SPEEDUP_TARGET
    result["met"] = bool(result["speedup"] >= SPEEDUP_TARGET)
    return result
