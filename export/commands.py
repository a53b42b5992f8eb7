"""The work of ``lungseg-export`` (:mod:`lungseg.export.cli` parses, then calls :func:`run`).

Imported only once a command runs, so ``--help`` stays instant. torch and onnx (the [train]
extra) load later still, inside the steps that need them: the device's ``--engine-only`` path
runs without them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from lungseg.bundle import BUNDLE_MANIFEST, ONNX_FP32, write_bundle_manifest
from lungseg.export.bundle_writer import GOLDEN_IDS, ExportOptions, engine_with_parity, export_bundle
from lungseg.export.exit_codes import (
    EXIT_CHECKPOINT,
    EXIT_ENGINE_IMPOSSIBLE,
    EXIT_EXPORT_FAILED,
    EXIT_OK,
    EXIT_PARITY_FAILED,
    EXIT_USAGE,
)
from lungseg.export.int8 import QuantOptions, stratified_calibration
from lungseg.export.openvino_int8 import patient_disjoint_calibration
from lungseg.export.parity import (
    DEFAULT_MIN_DICE_FP32,
    DEFAULT_MIN_DICE_REDUCED,
    MIN_PARITY_IMAGES,
    ParityResult,
    format_table,
)
from lungseg.export.samples import SampleSourceError, describe_source, load_samples, model_batch
from lungseg.tensorrt_build import EngineBuildError, EngineSettings, engine_settings, parse_profile
from lungseg.tensorrt_runtime import tensorrt_unavailable_reason

log = logging.getLogger("lungseg.export")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Settings checked, then the chosen command."""
    try:
        settings = (engine_settings(args.dla_core, workspace_mb=args.workspace_mb, timing_cache=args.timing_cache)
                    if args.dla_core is not None else
                    EngineSettings(parse_profile(args.profile), args.workspace_mb, args.timing_cache))
    except ValueError as exc:
        parser.error(str(exc))
    args.min_dice_fp32 = DEFAULT_MIN_DICE_FP32 if args.min_dice_fp32 is None else args.min_dice_fp32
    args.min_dice_reduced_given = args.min_dice_reduced is not None
    args.min_dice_reduced = DEFAULT_MIN_DICE_REDUCED if args.min_dice_reduced is None else args.min_dice_reduced
    if args.engine_only is not None:
        return _engine_only(args, settings)
    if args.drift_only:  # drift monitor reference only (issue 23)
        if args.drift_reference is None or args.checkpoint is not None or args.int8 or args.fp16 or args.engine:
            parser.error("--drift-only needs --drift-reference MANIFEST and --out BUNDLE, and no "
                         "checkpoint/--fp16/--int8")
        return _drift_reference(args)
    if args.gate_only:
        if args.gate_checkpoint is None or args.checkpoint is not None or args.int8 or args.fp16 or args.engine:
            parser.error("--gate-only needs --gate-checkpoint GATE_PT and --out BUNDLE, and no "
                         "checkpoint/--fp16/--int8")
        return _gate_only(args)
    return _export(args, settings)


def _fail(code: int, message: str) -> int:
    print(f"lungseg-export: {message}", file=sys.stderr)
    return code


def _engine_line(reason: str, bundle: Path) -> str:
    return (f"engine not built: {reason}. Build it on the device with: "
            f"lungseg-edge build-engine --model {bundle} --state STATE_DIR (or lungseg-export --engine-only "
            f"{bundle} --state STATE_DIR)")


def _gate_only(args: argparse.Namespace) -> int:
    """Swap the gate of an existing bundle: parity on the parity radiographs, then bundle.json rewritten."""
    if not (args.out / BUNDLE_MANIFEST).is_file():
        return _fail(EXIT_USAGE, f"{args.out}: not a model bundle (no {BUNDLE_MANIFEST})")
    try:
        parity_batch, data = _parity_batch(args)
    except (SampleSourceError, ValueError) as exc:
        return _fail(EXIT_USAGE, str(exc))
    return _add_gate(args, args.out, parity_batch, data)


def _parity_batch(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    samples = load_samples(args.parity_data, limit=args.max_images, with_masks=False)
    if len(samples) < MIN_PARITY_IMAGES:
        raise ValueError(f"parity needs at least {MIN_PARITY_IMAGES} radiographs; "
                         f"{describe_source(args.parity_data)} gave {len(samples)}")
    batch, _ = model_batch(samples)
    return batch, {"source": describe_source(args.parity_data), "n_images": len(samples),
                   "ids": [s.id for s in samples]}


def _export(args: argparse.Namespace, settings: Any) -> int:
    out: Path = args.out
    if args.engine:
        reason = tensorrt_unavailable_reason()
        if reason:
            return _fail(EXIT_ENGINE_IMPOSSIBLE, _engine_line(reason, out))
    try:
        from lungseg.nn.checkpoint import CheckpointError, default_checkpoint, load_checkpoint  # torch (optional)
    except ImportError as exc:
        return _fail(EXIT_USAGE, f"exporting needs the [train] extra: pip install 'lungseg[train]' ({exc})")

    checkpoint_path = args.checkpoint or default_checkpoint()
    try:
        checkpoint = load_checkpoint(checkpoint_path)
    except CheckpointError as exc:
        hint = "" if args.checkpoint else " (no CHECKPOINT given, so the shipped one was used: pass one)"
        return _fail(EXIT_CHECKPOINT, f"{exc}{hint}")
    try:
        parity_batch, data = _parity_batch(args)
        calibration = _calibration_batch(args, data["ids"]) if args.int8 else None
        openvino_calibration = _openvino_calibration(args, data["ids"]) if args.openvino else None
        if args.int8:  # moved into the int8 entry of parity.json
            data["calibration_overlap"] = getattr(args, "calibration_overlap", 0)
            data["calibration_ids"] = getattr(args, "calibration_ids", [])
    except (SampleSourceError, ValueError) as exc:
        return _fail(EXIT_USAGE, str(exc))

    from .onnx_export import OnnxValidationError  # torch, onnx (~1.8 s)

    try:
        report = export_bundle(out, checkpoint, parity_batch, data, _options(args, settings), calibration,
                               openvino_calibration)
    except OnnxValidationError as exc:
        return _fail(EXIT_EXPORT_FAILED, str(exc))
    engine = report["engine"]
    if engine.get("requested") and not engine.get("built"):
        print(_engine_line(engine["reason"], out), file=sys.stderr)
    _print_report(report, args.json)
    if not report["passed"]:
        return EXIT_PARITY_FAILED
    if args.gate_checkpoint is not None:
        code = _add_gate(args, out, parity_batch, data)
        if code != EXIT_OK:
            return code
    if args.drift_reference is not None:
        code = _drift_reference(args)
        if code != EXIT_OK:
            return code
    if args.engine and not engine.get("built"):
        return EXIT_ENGINE_IMPOSSIBLE
    return EXIT_OK


def _drift_reference(args: argparse.Namespace) -> int:
    """Add drift_reference.json to the bundle in --out (and hash it in bundle.json)."""
    from .drift_reference import add_drift_reference  # only for --drift-reference, like the other optional steps

    try:
        summary = add_drift_reference(args.out, args.drift_reference, args.drift_max_images)
    except (OSError, ValueError) as exc:
        return _fail(EXIT_USAGE, f"drift reference: {exc}")
    print(f"drift reference: {summary['images']} images, descriptors {', '.join(summary['descriptors'])} "
          f"-> drift_reference.json")
    return EXIT_OK


def _add_gate(args: argparse.Namespace, out: Path, parity_batch: Any, data: dict[str, Any]) -> int:
    """Add gate.onnx + shape_model.npz + gate.json, then refresh bundle.json so they are hashed too."""
    from .gate_export import GateExportError, add_gate  # torch, onnx (~1.9 s)

    try:
        gate = add_gate(out, args.gate_checkpoint, parity_batch, data, args.shape_model)
    except GateExportError as exc:
        return _fail(EXIT_PARITY_FAILED if "parity" in str(exc) else EXIT_CHECKPOINT, str(exc))
    previous = json.loads((out / BUNDLE_MANIFEST).read_text()) if (out / BUNDLE_MANIFEST).is_file() else {}
    extra = {k: v for k, v in previous.items() if k not in ("schema", "files")}
    extra["gate"] = {"version": gate["version"], "sha256": gate["sha256"],
                     "shape_model_sha256": gate["shape_model"]["sha256"]}
    write_bundle_manifest(out, extra)
    print(f"gate {gate['version']}: parity max |d logit| {gate['parity']['max_abs_logit_diff']:.2e}, "
          f"decisions identical: {gate['parity']['decisions_identical']} -> gate.onnx, shape_model.npz, gate.json")
    return EXIT_OK


def _options(args: argparse.Namespace, settings: Any) -> Any:
    quant = QuantOptions(quant_format=args.int8_format, per_channel=not args.int8_per_tensor,
                         reduce_range=args.int8_reduce_range, exclude_edge_convs=args.int8_exclude_edges,
                         method=args.int8_method, types=args.int8_types) if args.int8 else None
    return ExportOptions(fp16=args.fp16 or args.engine, int8=quant, engine=settings,
                         min_dice_fp32=args.min_dice_fp32, min_dice_reduced=args.min_dice_reduced,
                         min_dice_reduced_given=args.min_dice_reduced_given, threads=args.threads,
                         model_version=args.model_version, openvino=args.openvino)


def _calibration_batch(args: argparse.Namespace, parity_ids: list[str]) -> Any:
    """Calibration inputs, never including a parity image (parity is measured on unseen images)."""
    held_out = set(parity_ids) | set(GOLDEN_IDS)  # parity and self-test images are never calibration images
    source = args.calibration
    manifest = source / "manifest.csv" if source is not None and source.is_dir() else source
    if manifest is not None and manifest.suffix == ".csv" and manifest.is_file():
        batch, args.calibration_ids = stratified_calibration(manifest, held_out, args.max_images)
        return batch
    everything = load_samples(source, with_masks=False)
    samples = [s for s in everything if s.id not in held_out][:args.max_images]
    if not samples:
        samples = everything[:args.max_images]
        log.warning("int8 calibrated on the parity images themselves (%s): its parity is optimistic; pass "
                    "--calibration with other radiographs", describe_source(args.parity_data))
        args.calibration_overlap = len(samples)
    log.info("int8 calibration on %d radiographs", len(samples))
    args.calibration_ids = [s.id for s in samples]
    return model_batch(samples)[0]


def _openvino_calibration(args: argparse.Namespace, parity_ids: list[str]) -> tuple[Any, list[str]]:
    """NNCF calibration inputs: stratified, from patients with no image in the parity (or golden) set."""
    source = args.calibration
    manifest = source / "manifest.csv" if source is not None and source.is_dir() else source
    if manifest is None or manifest.suffix != ".csv" or not manifest.is_file():
        raise ValueError("--openvino needs --calibration MANIFEST (a manifest.csv with patient ids, so the "
                         "calibration images share no patient with the parity images)")
    return patient_disjoint_calibration(manifest, set(parity_ids) | set(GOLDEN_IDS), args.max_images)


def _engine_only(args: argparse.Namespace, settings: Any) -> int:
    bundle: Path = args.engine_only
    if not (bundle / ONNX_FP32).is_file():
        return _fail(EXIT_USAGE, f"{bundle}: not a bundle folder (no {ONNX_FP32})")
    reason = tensorrt_unavailable_reason()
    if reason:
        return _fail(EXIT_ENGINE_IMPOSSIBLE, _engine_line(reason, bundle))

    parity_batch = data = None
    if args.parity_data is not None:  # the bundle's own golden set always gates the engine; this adds a check
        try:
            parity_batch, data = _parity_batch(args)
        except (SampleSourceError, ValueError) as exc:
            return _fail(EXIT_USAGE, str(exc))


    cache = args.state / "engines" if args.state is not None else None
    try:
        report = engine_with_parity(bundle, _options(args, settings), engine_cache=cache, force=args.force,
                                    batch=parity_batch, data=data, checkpoint=args.checkpoint)
    except EngineBuildError as exc:
        return _fail(EXIT_ENGINE_IMPOSSIBLE, f"engine not usable: {exc}")
    _print_engine_report(report, args.json)
    return EXIT_OK if report["passed"] else EXIT_PARITY_FAILED


def _print_engine_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    parity = report["manifest"].get("parity") or {}
    print(f"engine: {report['engine']} ({report['source']}; TensorRT {report['manifest'].get('tensorrt_version')}, "
          f"{report['manifest'].get('typing')})")
    print(f"golden-set parity: mean Dice {parity.get('dice_mean')}, min {parity.get('dice_min')} -> "
          f"{'passed' if parity.get('passed') else 'FAILED'}")
    for name, entry in report["models"].items():
        print(f"{name} vs {report['reference']}: mean Dice {entry['dice_mean']:.5f}, min {entry['dice_min']:.5f} "
              f"-> {'pass' if entry['passed'] else 'FAIL'}")


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    results = {name: ParityResult(**{k: v for k, v in entry.items() if k in ParityResult.__dataclass_fields__})
               for name, entry in report["models"].items()}
    print(f"parity vs {report['reference']} on {report['data']['n_images']} radiographs "
          f"({report['data']['source']}):")
    print(format_table(results))
    speed = report["models"].get("model.int8.onnx", {}).get("speed")
    if speed:
        print(f"int8 vs fp32 on CPU ({speed['threads'] or 'default'} threads, batch {speed['batch']}): "
              f"{speed['fp32']['p50_ms']:.1f} ms -> {speed['int8']['p50_ms']:.1f} ms p50, "
              f"{speed['speedup']:.2f}x (target {speed['target']}x: {'met' if speed['met'] else 'NOT met'})")
    print(f"files: {', '.join(report['files'])}")
    print("parity: PASSED" if report["passed"] else "parity: FAILED (see parity.json)")
