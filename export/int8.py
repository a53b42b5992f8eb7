"""fp32 ONNX -> static INT8 ONNX for the CPU fallback (onnxruntime quantisation).

Steps: ``onnxruntime.quantization.shape_inference.quant_pre_process`` (shape
inference + graph optimisation), then ``quantize_static`` calibrated on real
radiographs that went through :mod:`lungseg.preprocess`. Defaults (chosen by
measurement on held-out radiographs against u8s8, s8s8 and u8u8 alternatives): QDQ format, per-channel int8 weights
with ``reduce_range`` (7-bit), uint8 activations, MinMax calibration, first and
last convolution kept in fp32.

Why reduce-range is the default: on x86 CPUs without VNNI (AVX2, AVX-512F)
onnxruntime's u8×s8 kernels use ``vpmaddubsw``, which adds two u8×s8 products in
a saturating int16: 255·127·2 = 64,770 overflows 32,767 and masks flip, on those
CPUs only. With 7-bit weights the worst case is 255·63·2 = 32,130, so no product
pair can saturate on any CPU: parity measured on one machine holds on all of them
by construction. ``types`` offers ``s8s8`` and ``u8u8`` for comparison (both
measured slower on x86 for the same parity). Whatever the CPU, the runtime's
start-up self-test (:mod:`lungseg.selftest`) runs the int8 model on the bundle's
golden set and serves fp32 instead if its masks differ.
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
from lungseg.data import load_manifest
from lungseg.imaging import read_image
from lungseg.predictors import OnnxRuntimePredictor
from lungseg.preprocess import preprocess_batch

from .timing import summary_ms, time_calls

log = logging.getLogger(__name__)

SPEEDUP_TARGET = 1.8
SPEED_BATCH = 4  # the edge runtime's default batch size
FORMATS = ("qdq", "qoperator")
METHODS = ("minmax", "entropy", "percentile")
TYPES = ("u8s8", "s8s8", "u8u8")  # activation x weight


@dataclass(frozen=True)
class QuantOptions:
    """How to quantise; the defaults are the ones shipped."""

    quant_format: str = "qdq"
    per_channel: bool = True
    reduce_range: bool = True
    exclude_edge_convs: bool = True
    method: str = "minmax"
    types: str = "u8s8"

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


def stratified_calibration(manifest: Path, held_out: set[str], limit: int) -> tuple[np.ndarray, list[str]]:
    """Up to ``limit`` calibration inputs drawn round-robin over the manifest's (view, portable) groups.

    So paediatric, PA and portable AP images all shape the activation ranges, whatever the row
    order; rows in ``held_out`` (the parity images) are never used. Order within a group is by a
    hash of the id: deterministic, and unrelated to the file order.
    """
    import hashlib

    groups: dict[tuple[str, bool], list[Any]] = {}
    for record in load_manifest(manifest):
        if record.id not in held_out:
            groups.setdefault((record.view, record.portable), []).append(record)
    for records in groups.values():
        records.sort(key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())
    chosen: list[Any] = []
    queues = [groups[k] for k in sorted(groups)]
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    if not chosen:
        raise ValueError(f"{manifest}: no calibration images left after holding out the parity images")
    batch, _ = preprocess_batch([read_image(r.image).pixels for r in chosen])
    log.info("int8 calibration: %d radiographs from %d (view, portable) groups", len(chosen), len(groups))
    return batch, [r.id for r in chosen]


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

    from lungseg.export.onnx_export import set_metadata, validate  # torch: the device's engine path runs without it

    options = options or QuantOptions()
    if options.quant_format not in FORMATS or options.method not in METHODS or options.types not in TYPES:
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
            activation_type=QuantType.QInt8 if options.types == "s8s8" else QuantType.QUInt8,
            weight_type=QuantType.QUInt8 if options.types == "u8u8" else QuantType.QInt8,
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
