"""Write a model bundle and check every model in it against a reference: the export pipeline.

:func:`export_bundle` runs fp32 ONNX -> (fp16 ONNX -> TensorRT engine) -> (int8 ONNX),
compares each against PyTorch on the same preprocessed radiographs and writes
``parity.json``. :func:`engine_with_parity` is the on-device ``--engine-only`` path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import lungseg
from lungseg.bundle import (
    ENGINE_FP16,
    ENGINE_MANIFEST,
    ONNX_FP16,
    ONNX_FP32,
    ONNX_INT8,
    PARITY,
    resolve_bundle,
)
from lungseg.predictors import BackendUnavailableError, OnnxRuntimePredictor, Predictor

from .int8 import QuantOptions
from .parity import (
    DEFAULT_MIN_DICE_FP32,
    DEFAULT_MIN_DICE_REDUCED,
    DEFAULT_THRESHOLD,
    GATE_STATISTIC,
    ParityResult,
    compare,
    predict_in_chunks,
    required_dice,
    write_json,
)
from .tensorrt_build import EngineBuildError, EngineSettings

log = logging.getLogger(__name__)

VARIANTS = (ONNX_FP16, ONNX_INT8, ENGINE_FP16, ENGINE_MANIFEST, PARITY)


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how strictly to check it."""

    fp16: bool = False
    int8: QuantOptions | None = None
    engine: EngineSettings = field(default_factory=EngineSettings)
    min_dice_fp32: float = DEFAULT_MIN_DICE_FP32
    min_dice_reduced: float = DEFAULT_MIN_DICE_REDUCED
    threads: int | None = None


class _Checker:
    """Runs candidates on the parity batch and compares them with the reference probabilities."""

    def __init__(self, batch: np.ndarray, reference: np.ndarray, reference_name: str, options: ExportOptions):
        self.batch, self.reference, self.reference_name, self.options = batch, reference, reference_name, options

    def check(self, name: str, predictor: Predictor) -> ParityResult:
        candidate = predict_in_chunks(predictor.predict, self.batch)
        result = compare(
            self.reference, candidate, candidate_name=name, reference_name=self.reference_name,
            precision=predictor.precision,
            min_dice=required_dice(predictor.precision, self.options.min_dice_fp32, self.options.min_dice_reduced),
        )
        log.info("parity %s: mean Dice %.5f (min %.5f), max |d| %.2e -> %s", name, result.dice_mean,
                 result.dice_min, result.abs_diff_max, "pass" if result.passed else "FAIL")
        return result

    def onnx(self, path: Path) -> ParityResult:
        return self.check(path.name, OnnxRuntimePredictor(str(path), device="cpu", threads=self.options.threads))


def _report(reference: str, data: dict[str, Any], options: ExportOptions) -> dict[str, Any]:
    return {
        "passed": True,
        "reference": reference,
        "criterion": f"{GATE_STATISTIC} (mask Dice vs reference, threshold {DEFAULT_THRESHOLD}) >= required_dice",
        "thresholds": {"fp32": options.min_dice_fp32, "reduced": options.min_dice_reduced},
        "data": data,
        "models": {},
        "engine": {"requested": options.fp16},
        "files": [],
        "lungseg_version": lungseg.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _finish(report: dict[str, Any], bundle: Path) -> dict[str, Any]:
    report["passed"] = all(entry["passed"] for entry in report["models"].values())
    report["files"] = sorted({p.name for p in bundle.iterdir() if p.is_file() and p.suffix != ".tmp"} | {PARITY})
    write_json(bundle / PARITY, report)
    return report


def _try_engine(bundle: Path, checker: _Checker,
                settings: EngineSettings) -> tuple[dict[str, Any], ParityResult | None]:
    from lungseg.tensorrt_runtime import load_engine_predictor, tensorrt_unavailable_reason

    from .tensorrt_build import build_engine

    reason = tensorrt_unavailable_reason()
    if reason:
        return {"requested": True, "built": False, "reason": reason}, None
    try:
        manifest = build_engine(bundle, settings)
        predictor = load_engine_predictor(resolve_bundle(bundle), rebuild=False)
    except (EngineBuildError, BackendUnavailableError) as exc:
        return {"requested": True, "built": False, "reason": str(exc)}, None
    return {"requested": True, "built": True, "manifest": manifest}, checker.check(ENGINE_FP16, predictor)


def export_bundle(out: Path, checkpoint: Any, batch: np.ndarray, data: dict[str, Any], options: ExportOptions,
                  calibration: np.ndarray | None = None) -> dict[str, Any]:
    """Export ``checkpoint`` into ``out`` and check every model; returns (and writes) the parity report."""
    from .checkpoint import TorchPredictor
    from .fp16 import convert_fp16
    from .int8 import measure_speedup, quantize_int8
    from .onnx_export import bundle_metadata, export_fp32

    out.mkdir(parents=True, exist_ok=True)
    for name in VARIANTS:
        if (out / name).is_file():
            log.info("removing %s from an earlier export", out / name)
            (out / name).unlink()
    reference = predict_in_chunks(TorchPredictor(checkpoint, options.threads).predict, batch)
    checker = _Checker(batch, reference, "pytorch", options)
    report = _report("pytorch", data, options)
    report["checkpoint"] = {"file": checkpoint.path.name, "sha256": checkpoint.sha256,
                            "init_features": checkpoint.init_features, **checkpoint.info}
    metadata = bundle_metadata(checkpoint)
    fp32 = export_fp32(checkpoint, out / ONNX_FP32)
    report["models"][ONNX_FP32] = checker.onnx(fp32).to_dict()
    if options.fp16:
        report["models"][ONNX_FP16] = checker.onnx(convert_fp16(fp32, out / ONNX_FP16, metadata)).to_dict()
        report["engine"], engine_result = _try_engine(out, checker, options.engine)
        if engine_result is not None:
            report["models"][ENGINE_FP16] = engine_result.to_dict()
    if options.int8 is not None and calibration is not None:
        int8 = quantize_int8(fp32, out / ONNX_INT8, calibration, metadata, options.int8)
        entry = checker.onnx(int8).to_dict()
        entry["quantization"] = options.int8.to_dict()
        entry["calibration_images"] = len(calibration)
        entry["speed"] = measure_speedup(fp32, int8, batch[:1], threads=options.threads)
        if not entry["speed"]["met"]:
            log.warning("int8 speedup %.2fx is below the %.1fx target", entry["speed"]["speedup"],
                        entry["speed"]["target"])
        report["models"][ONNX_INT8] = entry
    return _finish(report, out)


def _engine_reference(bundle: Path, checkpoint: Path | None, threads: int | None) -> tuple[Predictor, str]:
    """PyTorch when torch and the checkpoint are here, else onnxruntime CPU on ``model.onnx``."""
    path = checkpoint or bundle / "checkpoint.pt"
    if path.is_file():
        try:
            from .checkpoint import TorchPredictor, load_checkpoint

            return TorchPredictor(load_checkpoint(path), threads), "pytorch"
        except ImportError as exc:
            log.warning("torch unavailable (%s): comparing the engine with onnxruntime CPU instead", exc)
    return OnnxRuntimePredictor(str(bundle / ONNX_FP32), device="cpu", threads=threads), f"onnxruntime-cpu {ONNX_FP32}"


def engine_with_parity(bundle: Path, batch: np.ndarray, data: dict[str, Any], options: ExportOptions,
                       checkpoint: Path | None = None) -> dict[str, Any]:
    """Build the bundle's engine here, check it, and merge the result into ``parity.json``."""
    from lungseg.tensorrt_runtime import load_engine_predictor

    from .tensorrt_build import build_engine

    reference_predictor, reference_name = _engine_reference(bundle, checkpoint, options.threads)
    reference = predict_in_chunks(reference_predictor.predict, batch)
    checker = _Checker(batch, reference, reference_name, options)
    manifest = build_engine(bundle, options.engine)
    try:
        predictor = load_engine_predictor(resolve_bundle(bundle), rebuild=False)
    except BackendUnavailableError as exc:
        raise EngineBuildError(f"the engine was built but cannot run: {exc}") from exc
    parity_path = bundle / PARITY
    report = json.loads(parity_path.read_text()) if parity_path.is_file() else _report(
        reference_name, data, options)
    report["models"][ENGINE_FP16] = checker.check(ENGINE_FP16, predictor).to_dict()
    report["models"][ENGINE_FP16]["data"] = data
    report["engine"] = {"requested": True, "built": True, "manifest": manifest}
    return _finish(report, bundle)
