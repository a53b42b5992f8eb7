"""Write a model bundle and check every model in it against a reference: the export pipeline.

:func:`export_bundle` runs fp32 ONNX -> (fp16 ONNX -> TensorRT engine) -> (int8 ONNX),
compares each against PyTorch on the same preprocessed radiographs and writes
``parity.json``. :func:`engine_with_parity` is the on-device ``--engine-only`` path.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import lungseg
from lungseg.bundle import (
    BUNDLE_MANIFEST,
    ENGINE_FILE,
    ENGINE_MANIFEST,
    GATE_MANIFEST,
    GATE_ONNX,
    GOLDEN,
    LEGACY_ENGINE_FILE,
    ONNX_FP16,
    ONNX_FP32,
    ONNX_INT8,
    PARITY,
    SHAPE_MODEL,
    read_onnx_metadata,
    resolve_bundle,
    write_bundle_manifest,
)
from lungseg.engine_cache import EngineCache
from lungseg.export.int8 import measure_speedup, quantize_int8
from lungseg.export.samples import SampleSourceError, default_source, load_samples, model_batch
from lungseg.openvino_runtime import OPENVINO_INT8_BIN, OPENVINO_INT8_XML, OpenVINOPredictor
from lungseg.predictors import BackendOptions, BackendUnavailableError, OnnxRuntimePredictor, Predictor
from lungseg.selftest import write_golden
from lungseg.tensorrt_build import EngineBuildError, EngineSettings
from lungseg.tensorrt_runtime import (
    TensorRTPredictor,
    build_checked_engine,
    cuda_device_identity,
    engine_key,
    ensure_engine,
    import_tensorrt,
    tensorrt_unavailable_reason,
)

from .int8 import SPEED_BATCH, QuantOptions
from .openvino_int8 import REQUIRED as OPENVINO_REQUIRED
from .openvino_int8 import quantize_openvino_int8
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

log = logging.getLogger(__name__)

VARIANTS = (ONNX_FP16, ONNX_INT8, OPENVINO_INT8_XML, OPENVINO_INT8_BIN, ENGINE_FILE, LEGACY_ENGINE_FILE,
            ENGINE_MANIFEST, PARITY, GOLDEN, BUNDLE_MANIFEST, GATE_ONNX, GATE_MANIFEST, SHAPE_MODEL)
# committed CC BY 4.0 fixtures (tests/fixtures/cxr) that make up the bundle's self-test golden set
GOLDEN_IDS = ("0e132bd64729", "355c06b0444a", "05878ee1390b", "ead2c3ca8955")
INT8_REQUIRED = (0.995, 0.98)  # mean and worst-image mask Dice vs PyTorch, on images not used for calibration


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how strictly to check it."""

    fp16: bool = False
    int8: QuantOptions | None = None
    engine: EngineSettings = field(default_factory=EngineSettings)
    min_dice_fp32: float = DEFAULT_MIN_DICE_FP32
    min_dice_reduced: float = DEFAULT_MIN_DICE_REDUCED
    min_dice_reduced_given: bool = False  # an explicit --min-dice-reduced replaces the int8 requirement
    threads: int | None = None
    model_version: str | None = None  # the bundle's one version (default: the checkpoint's)
    openvino: bool = False  # also the OpenVINO int8 IR (NNCF post-training quantisation; the [openvino] extra)


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
    report["files"] = sorted({p.name for p in bundle.iterdir() if p.is_file() and p.suffix != ".tmp"}
                             | {PARITY, BUNDLE_MANIFEST})
    write_json(bundle / PARITY, report)
    meta = read_onnx_metadata(bundle / ONNX_FP32) if (bundle / ONNX_FP32).is_file() else {}
    write_bundle_manifest(bundle, {"model_name": meta.get("model_name"), "model_version": meta.get("model_version"),
                                   "lungseg_version": lungseg.__version__, "golden": report.get("golden"),
                                   "int8": report["models"].get(ONNX_INT8, {}).get("quantization"),
                                   "openvino_int8": report["models"].get(OPENVINO_INT8_XML, {}).get("quantization")})
    return report


def write_golden_set(out: Path, predict: Any, fallback: np.ndarray, fallback_ids: list[str]) -> dict[str, Any]:
    """``golden.npz`` from the committed fixtures :data:`GOLDEN_IDS` (else the first parity images)."""
    try:
        samples = {s.id: s for s in load_samples(default_source(), with_masks=False)}
        chosen = [samples[i] for i in GOLDEN_IDS]
        ids, inputs, source = list(GOLDEN_IDS), model_batch(chosen)[0], "tests/fixtures/cxr (CC BY 4.0)"
    except (SampleSourceError, KeyError) as exc:
        log.warning("golden set from the parity images (fixtures unavailable: %s)", exc)
        ids, inputs, source = fallback_ids[:len(GOLDEN_IDS)], fallback[:len(GOLDEN_IDS)], "parity data"
    info = write_golden(out / GOLDEN, ids, inputs, lambda x: predict_in_chunks(predict, x))
    info["source"] = source
    log.info("wrote %s (%d radiographs, %d bytes)", GOLDEN, info["n_images"], info["bytes"])
    return info


def build_engine_into_bundle(bundle: Path, settings: EngineSettings) -> dict[str, Any]:
    """Export time: build, parity-gate (golden set) and place ``model.engine`` + ``engine.json`` in ``bundle``."""
    import shutil
    import tempfile

    trt = import_tensorrt()
    key, onnx_path, typing = engine_key(trt, bundle, settings, cuda_device_identity())
    with tempfile.TemporaryDirectory(prefix="lungseg-engine-") as tmp:
        path, manifest = build_checked_engine(trt, bundle, settings, EngineCache(Path(tmp)), key, onnx_path, typing)
        for name in (ENGINE_FILE, ENGINE_MANIFEST):
            shutil.copyfile(path.parent / name, bundle / (name + ".tmp"))
            (bundle / (name + ".tmp")).replace(bundle / name)
    return manifest


def _try_engine(bundle: Path, checker: _Checker,
                settings: EngineSettings) -> tuple[dict[str, Any], ParityResult | None]:
    reason = tensorrt_unavailable_reason()
    if reason:
        return {"requested": True, "built": False, "reason": reason}, None
    try:
        manifest = build_engine_into_bundle(bundle, settings)
        predictor = TensorRTPredictor(import_tensorrt(), (bundle / ENGINE_FILE).read_bytes(),
                                      model_path=str(bundle / ENGINE_FILE), dla_core=settings.dla_core)
    except (EngineBuildError, BackendUnavailableError) as exc:
        return {"requested": True, "built": False, "reason": str(exc)}, None
    try:
        result = checker.check(ENGINE_FILE, predictor)
    finally:
        predictor.close()
    if result is not None and not result.passed:  # the engine is not shipped in a bundle it does not match
        for name in (ENGINE_FILE, ENGINE_MANIFEST):
            (bundle / name).unlink(missing_ok=True)
        return {"requested": True, "built": True, "shipped": False, "manifest": manifest,
                "reason": "the engine failed the comparison with PyTorch on held-out images; removed from the "
                          "bundle"}, result
    return {"requested": True, "built": True, "shipped": True, "manifest": manifest}, result


def add_openvino_int8(bundle: Path, calibration: np.ndarray, calibration_ids: list[str],
                      checker: _Checker) -> dict[str, Any]:
    """NNCF int8 IR of ``bundle/model.onnx`` into ``bundle``, parity-checked by ``checker`` (held-out images)."""
    quantization = quantize_openvino_int8(bundle / ONNX_FP32, bundle, calibration)
    predictor = OpenVINOPredictor(bundle / OPENVINO_INT8_XML, "int8",
                                  options=BackendOptions(threads=checker.options.threads))
    try:
        entry = checker.check(OPENVINO_INT8_XML, predictor).to_dict()
    finally:
        predictor.close()
    entry["quantization"] = quantization
    entry["calibration_ids"] = list(calibration_ids)
    entry["required_dice"], entry["required_dice_min"] = OPENVINO_REQUIRED
    entry["passed"] = bool(entry["dice_mean"] >= OPENVINO_REQUIRED[0] and entry["dice_min"] >= OPENVINO_REQUIRED[1])
    return entry


def export_bundle(out: Path, checkpoint: Any, batch: np.ndarray, data: dict[str, Any], options: ExportOptions,
                  calibration: np.ndarray | None = None,
                  openvino_calibration: tuple[np.ndarray, list[str]] | None = None) -> dict[str, Any]:
    """Export ``checkpoint`` into ``out`` and check every model; returns (and writes) the parity report."""
    # torch and onnx (the [train] extra) load here: the engine path of this module runs on the device without them
    from lungseg.export.fp16 import convert_fp16
    from lungseg.export.onnx_export import bundle_metadata, export_fp32
    from lungseg.nn.checkpoint import TorchPredictor

    out.mkdir(parents=True, exist_ok=True)
    for name in VARIANTS:
        if (out / name).is_file():
            log.info("removing %s from an earlier export", out / name)
            (out / name).unlink()
    torch_predictor = TorchPredictor(checkpoint, options.threads)
    reference = predict_in_chunks(torch_predictor.predict, batch)
    checker = _Checker(batch, reference, "pytorch", options)
    report = _report("pytorch", data, options)
    report["checkpoint"] = {"file": checkpoint.path.name, "sha256": checkpoint.sha256,
                            "init_features": checkpoint.init_features, **checkpoint.info}
    if options.model_version:  # one version for the whole bundle: ONNX metadata of every model and bundle.json
        checkpoint = dataclasses.replace(checkpoint, model_version=options.model_version)
    metadata = bundle_metadata(checkpoint)
    fp32 = export_fp32(checkpoint, out / ONNX_FP32)
    report["models"][ONNX_FP32] = checker.onnx(fp32).to_dict()
    report["golden"] = write_golden_set(out, torch_predictor.predict, batch, list(data.get("ids", [])))
    if options.fp16:
        report["models"][ONNX_FP16] = checker.onnx(convert_fp16(fp32, out / ONNX_FP16, metadata)).to_dict()
        report["engine"], engine_result = _try_engine(out, checker, options.engine)
        if engine_result is not None:
            report["models"][ENGINE_FILE] = engine_result.to_dict()
    if options.int8 is not None and calibration is not None:
        int8 = quantize_int8(fp32, out / ONNX_INT8, calibration, metadata, options.int8)
        entry = checker.onnx(int8).to_dict()
        entry["quantization"] = options.int8.to_dict()
        entry["calibration_images"] = len(calibration)
        need_mean, need_min = INT8_REQUIRED
        if options.min_dice_reduced_given:
            need_mean, need_min = options.min_dice_reduced, 0.0
        entry["calibration_overlaps_parity"] = int(data.pop("calibration_overlap", 0))
        entry["calibration_ids"] = list(data.pop("calibration_ids", []))
        entry["required_dice_min"] = need_min
        entry["required_dice"] = need_mean
        entry["passed"] = bool(entry["dice_mean"] >= entry["required_dice"] and entry["dice_min"] >= need_min)
        entry["speed"] = measure_speedup(fp32, int8, batch[:SPEED_BATCH], threads=options.threads)
        if not entry["speed"]["met"]:
            log.warning("int8 speedup %.2fx is below the %.1fx target", entry["speed"]["speedup"],
                        entry["speed"]["target"])
        report["models"][ONNX_INT8] = entry
    if options.openvino and openvino_calibration is not None:
        report["models"][OPENVINO_INT8_XML] = add_openvino_int8(out, *openvino_calibration, checker)
    return _finish(report, out)


def _engine_reference(bundle: Path, checkpoint: Path | None, threads: int | None) -> tuple[Predictor, str]:
    """PyTorch when torch and the checkpoint are here, else onnxruntime CPU on ``model.onnx``."""
    path = checkpoint or bundle / "checkpoint.pt"
    if path.is_file():
        try:
            from lungseg.nn.checkpoint import TorchPredictor, load_checkpoint  # torch: optional on the device

            return TorchPredictor(load_checkpoint(path), threads), "pytorch"
        except ImportError as exc:
            log.warning("torch unavailable (%s): comparing the engine with onnxruntime CPU instead", exc)
    return OnnxRuntimePredictor(str(bundle / ONNX_FP32), device="cpu", threads=threads), f"onnxruntime-cpu {ONNX_FP32}"


def engine_with_parity(bundle: Path, options: ExportOptions, *, engine_cache: Path | None, force: bool = False,
                       batch: np.ndarray | None = None, data: dict[str, Any] | None = None,
                       checkpoint: Path | None = None) -> dict[str, Any]:
    """On the device: find or build the bundle's engine in the engine cache (never in the bundle), gated on the
    bundle's own golden set; with ``batch`` also compare it with a reference on those images. Returns a report."""
    backend_options = BackendOptions(threads=options.threads, engine_cache=engine_cache,
                                     dla_core=options.engine.dla_core)
    bundle_obj = resolve_bundle(bundle)
    try:
        path, manifest, where = ensure_engine(bundle_obj, backend_options, settings=options.engine, force=force)
    except BackendUnavailableError as exc:
        raise EngineBuildError(str(exc)) from exc
    report: dict[str, Any] = {"passed": bool((manifest.get("parity") or {}).get("passed")), "engine": str(path),
                              "source": where, "manifest": manifest, "models": {}}
    if batch is not None:
        reference_predictor, reference_name = _engine_reference(bundle, checkpoint, options.threads)
        checker = _Checker(batch, predict_in_chunks(reference_predictor.predict, batch), reference_name, options)
        predictor = TensorRTPredictor(import_tensorrt(), path.read_bytes(), model_path=str(path),
                                      dla_core=options.engine.dla_core)
        try:
            result = checker.check(ENGINE_FILE, predictor).to_dict()
        finally:
            predictor.close()
        report["models"][ENGINE_FILE] = {**result, "data": data}
        report["reference"], report["data"] = reference_name, data
        report["passed"] = report["passed"] and result["passed"]
    return report
