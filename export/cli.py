"""``lungseg-export``: a training checkpoint -> a validated model bundle folder.

Heavy imports (torch, onnx, onnxruntime, tensorrt) happen inside :func:`main`, so
``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_PARITY_FAILED = 1
EXIT_USAGE = 2
EXIT_CHECKPOINT = 3
EXIT_ENGINE_IMPOSSIBLE = 4
EXIT_EXPORT_FAILED = 5

DEFAULT_MAX_IMAGES = 64

log = logging.getLogger("lungseg.export")

EPILOG = f"""\
outputs (in --out): model.onnx (fp32), model.fp16.onnx (--fp16), model.int8.onnx (--int8),
  model.fp16.engine + engine.json (--fp16/--engine where TensorRT and a CUDA GPU are present),
  parity.json (every run). Variants from an earlier export in --out are removed first.
parity: each model vs PyTorch on >= 16 real radiographs; a model passes when its mean mask
  Dice (threshold 0.5) reaches --min-dice-fp32 (fp32) or --min-dice-reduced (fp16, int8).
exit codes: {EXIT_OK} ok; {EXIT_PARITY_FAILED} a model failed parity (parity.json says "passed": false);
  {EXIT_USAGE} usage error or unusable image data; {EXIT_CHECKPOINT} checkpoint missing or corrupt;
  {EXIT_ENGINE_IMPOSSIBLE} TensorRT engine requested (--engine / --engine-only) but impossible here;
  {EXIT_EXPORT_FAILED} an exported file failed validation.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungseg-export",
        description="Export a lungseg training checkpoint to a model bundle (ONNX fp32, optional fp16, "
        "int8 and TensorRT FP16 engine), checking every model against PyTorch on real radiographs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", nargs="?", type=Path, default=None, metavar="CHECKPOINT",
                        help="training checkpoint .pt (default: the shipped models/default/checkpoint.pt)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="bundle folder to write (required)")
    parser.add_argument("--fp16", action="store_true",
                        help="also write model.fp16.onnx, and the TensorRT engine where possible")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (static QDQ, CPU)")
    parser.add_argument("--engine", action="store_true",
                        help=f"like --fp16, but the TensorRT engine is required (exit {EXIT_ENGINE_IMPOSSIBLE} "
                        "if it cannot be built here)")
    parser.add_argument("--engine-only", type=Path, metavar="BUNDLE", default=None,
                        help="build (or rebuild) the TensorRT engine of an existing bundle, on the device")
    parser.add_argument("--calibration", type=Path, metavar="MANIFEST_OR_DIR", default=None,
                        help="int8 calibration radiographs (default: the committed fixtures)")
    parser.add_argument("--parity-data", type=Path, metavar="MANIFEST_OR_DIR", default=None,
                        help="parity radiographs (default: the committed fixtures tests/fixtures/cxr)")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, metavar="N",
                        help="use at most N images for parity and for calibration (default: %(default)s)")
    parser.add_argument("--min-dice-fp32", type=float, default=None, metavar="D",
                        help="minimum mean mask Dice of fp32 models vs PyTorch (default: 0.999)")
    parser.add_argument("--min-dice-reduced", type=float, default=None, metavar="D",
                        help="minimum mean mask Dice of fp16/int8 models vs PyTorch (default: 0.99)")
    parser.add_argument("--workspace-mb", type=int, default=1024, metavar="MB",
                        help="TensorRT builder workspace limit (default: %(default)s)")
    parser.add_argument("--profile", default="1,1,8", metavar="MIN,OPT,MAX",
                        help="TensorRT optimisation profile for the batch size (default: %(default)s)")
    parser.add_argument("--timing-cache", type=Path, default=None, metavar="PATH",
                        help="TensorRT timing cache file, reused across builds (default: none)")
    device = parser.add_argument_group("--engine-only options (on the device; the bundle is never written)")
    device.add_argument("--state", type=Path, default=None, metavar="DIR",
                        help="the service's state folder: the engine goes to DIR/engines, where lungseg-edge "
                        "looks for it (default: $LUNGSEG_ENGINE_CACHE, $STATE_DIRECTORY/engines or "
                        "~/.cache/lungseg/engines)")
    device.add_argument("--force", action="store_true", help="rebuild even if a checked engine (or a refusal) exists")
    device.add_argument("--dla-core", type=int, default=None, metavar="N",
                        help="build for DLA core N (Jetson AGX/NX Orin), GPU fallback for unsupported layers")
    quant = parser.add_argument_group("int8 options")
    quant.add_argument("--int8-format", choices=("qdq", "qoperator"), default="qdq")
    quant.add_argument("--int8-per-tensor", action="store_true", help="per-tensor instead of per-channel weights")
    quant.add_argument("--int8-reduce-range", action=argparse.BooleanOptionalAction, default=True,
                       help="7-bit weights: no u8xs8 saturation on x86 CPUs without VNNI (default: on)")
    quant.add_argument("--int8-exclude-edges", action=argparse.BooleanOptionalAction, default=True,
                       help="keep the first and last convolution in fp32 (default: on)")
    quant.add_argument("--int8-types", choices=("u8s8", "s8s8", "u8u8"), default="u8s8",
                       help="activation x weight types (default: %(default)s)")
    quant.add_argument("--int8-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                       help="calibration method (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime")
    parser.add_argument("--gate", type=Path, default=None, metavar="GATE_CHECKPOINT",
                        help="also add the image gate: gate.pt from lungseg-train gate (its shape_model.npz beside "
                        "it); gate.onnx, shape_model.npz and gate.json go into the bundle after a parity check")
    parser.add_argument("--shape-model", type=Path, default=None, metavar="NPZ",
                        help="the mask shape model to add with --gate (default: shape_model.npz beside the checkpoint)")
    parser.add_argument("--gate-only", action="store_true",
                        help="with --gate and --out: replace the gate (and shape model) of the existing bundle in "
                        "--out, leaving its segmenter models untouched; bundle.json is rewritten")
    parser.add_argument("--json", action="store_true", help="print the parity report as JSON on stdout")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _fail(code: int, message: str) -> int:
    print(f"lungseg-export: {message}", file=sys.stderr)
    return code


def _engine_line(reason: str, bundle: Path) -> str:
    return (f"engine not built: {reason}. Build it on the device with: "
            f"lungseg-edge build-engine --model {bundle} --state STATE_DIR (or lungseg-export --engine-only "
            f"{bundle} --state STATE_DIR)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.engine_only is None and args.out is None:
        parser.error("--out DIR is required (or --engine-only BUNDLE)")
    if args.engine_only is not None and (args.out is not None or args.int8 or args.fp16):
        parser.error("--engine-only works on an existing bundle: drop --out/--fp16/--int8")
    if args.max_images < 1:
        parser.error("--max-images must be >= 1")
    from lungseg.tensorrt_build import EngineSettings, parse_profile

    from .parity import DEFAULT_MIN_DICE_FP32, DEFAULT_MIN_DICE_REDUCED

    try:
        settings = EngineSettings(parse_profile(args.profile), args.workspace_mb, args.timing_cache, args.dla_core)
    except ValueError as exc:
        parser.error(str(exc))
    args.min_dice_fp32 = DEFAULT_MIN_DICE_FP32 if args.min_dice_fp32 is None else args.min_dice_fp32
    args.min_dice_reduced_given = args.min_dice_reduced is not None
    args.min_dice_reduced = DEFAULT_MIN_DICE_REDUCED if args.min_dice_reduced is None else args.min_dice_reduced
    if args.engine_only is not None:
        return _engine_only(args, settings)
    if args.gate_only:
        if args.gate is None or args.checkpoint is not None or args.int8 or args.fp16 or args.engine:
            parser.error("--gate-only needs --gate GATE_CHECKPOINT and --out BUNDLE, and no checkpoint/--fp16/--int8")
        return _gate_only(args)
    return _export(args, settings)


def _gate_only(args: argparse.Namespace) -> int:
    """Swap the gate of an existing bundle: parity on the parity radiographs, then bundle.json rewritten."""
    from lungseg.bundle import BUNDLE_MANIFEST

    from .samples import SampleSourceError

    if not (args.out / BUNDLE_MANIFEST).is_file():
        return _fail(EXIT_USAGE, f"{args.out}: not a model bundle (no {BUNDLE_MANIFEST})")
    try:
        parity_batch, data = _parity_batch(args)
    except (SampleSourceError, ValueError) as exc:
        return _fail(EXIT_USAGE, str(exc))
    return _add_gate(args, args.out, parity_batch, data)


def _parity_batch(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from .parity import MIN_PARITY_IMAGES
    from .samples import describe_source, load_samples, model_batch

    samples = load_samples(args.parity_data, limit=args.max_images, with_masks=False)
    if len(samples) < MIN_PARITY_IMAGES:
        raise ValueError(f"parity needs at least {MIN_PARITY_IMAGES} radiographs; "
                         f"{describe_source(args.parity_data)} gave {len(samples)}")
    batch, _ = model_batch(samples)
    return batch, {"source": describe_source(args.parity_data), "n_images": len(samples),
                   "ids": [s.id for s in samples]}


def _export(args: argparse.Namespace, settings: Any) -> int:
    from lungseg.tensorrt_runtime import tensorrt_unavailable_reason

    out: Path = args.out
    if args.engine:
        reason = tensorrt_unavailable_reason()
        if reason:
            return _fail(EXIT_ENGINE_IMPOSSIBLE, _engine_line(reason, out))
    try:
        from lungseg.nn.checkpoint import CheckpointError, default_checkpoint, load_checkpoint
    except ImportError as exc:
        return _fail(EXIT_USAGE, f"exporting needs the [train] extra: pip install 'lungseg[train]' ({exc})")
    from .samples import SampleSourceError

    checkpoint_path = args.checkpoint or default_checkpoint()
    try:
        checkpoint = load_checkpoint(checkpoint_path)
    except CheckpointError as exc:
        hint = "" if args.checkpoint else " (no CHECKPOINT given, so the shipped one was used: pass one)"
        return _fail(EXIT_CHECKPOINT, f"{exc}{hint}")
    try:
        parity_batch, data = _parity_batch(args)
        calibration = _calibration_batch(args, data["ids"]) if args.int8 else None
        if args.int8:  # moved into the int8 entry of parity.json
            data["calibration_overlap"] = getattr(args, "calibration_overlap", 0)
            data["calibration_ids"] = getattr(args, "calibration_ids", [])
    except (SampleSourceError, ValueError) as exc:
        return _fail(EXIT_USAGE, str(exc))

    from .bundle_writer import export_bundle
    from .onnx_export import OnnxValidationError

    try:
        report = export_bundle(out, checkpoint, parity_batch, data, _options(args, settings), calibration)
    except OnnxValidationError as exc:
        return _fail(EXIT_EXPORT_FAILED, str(exc))
    engine = report["engine"]
    if engine.get("requested") and not engine.get("built"):
        print(_engine_line(engine["reason"], out), file=sys.stderr)
    _print_report(report, args.json)
    if not report["passed"]:
        return EXIT_PARITY_FAILED
    if args.gate is not None:
        code = _add_gate(args, out, parity_batch, data)
        if code != EXIT_OK:
            return code
    if args.engine and not engine.get("built"):
        return EXIT_ENGINE_IMPOSSIBLE
    return EXIT_OK


def _add_gate(args: argparse.Namespace, out: Path, parity_batch: Any, data: dict[str, Any]) -> int:
    """Add gate.onnx + shape_model.npz + gate.json, then refresh bundle.json so they are hashed too."""
    import json

    from lungseg.bundle import BUNDLE_MANIFEST, write_bundle_manifest

    from .gate_export import GateExportError, add_gate

    try:
        gate = add_gate(out, args.gate, parity_batch, data, args.shape_model)
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
    from .bundle_writer import ExportOptions
    from .int8 import QuantOptions

    quant = QuantOptions(quant_format=args.int8_format, per_channel=not args.int8_per_tensor,
                         reduce_range=args.int8_reduce_range, exclude_edge_convs=args.int8_exclude_edges,
                         method=args.int8_method, types=args.int8_types) if args.int8 else None
    return ExportOptions(fp16=args.fp16 or args.engine, int8=quant, engine=settings,
                         min_dice_fp32=args.min_dice_fp32, min_dice_reduced=args.min_dice_reduced,
                         min_dice_reduced_given=args.min_dice_reduced_given, threads=args.threads)


def _calibration_batch(args: argparse.Namespace, parity_ids: list[str]) -> Any:
    """Calibration inputs, never including a parity image (parity is measured on unseen images)."""
    from .bundle_writer import GOLDEN_IDS
    from .samples import describe_source, load_samples, model_batch

    held_out = set(parity_ids) | set(GOLDEN_IDS)  # parity and self-test images are never calibration images
    source = args.calibration
    manifest = source / "manifest.csv" if source is not None and source.is_dir() else source
    if manifest is not None and manifest.suffix == ".csv" and manifest.is_file():
        from .int8 import stratified_calibration

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


def _engine_only(args: argparse.Namespace, settings: Any) -> int:
    from lungseg.bundle import ONNX_FP32
    from lungseg.tensorrt_runtime import tensorrt_unavailable_reason

    bundle: Path = args.engine_only
    if not (bundle / ONNX_FP32).is_file():
        return _fail(EXIT_USAGE, f"{bundle}: not a bundle folder (no {ONNX_FP32})")
    reason = tensorrt_unavailable_reason()
    if reason:
        return _fail(EXIT_ENGINE_IMPOSSIBLE, _engine_line(reason, bundle))
    from .samples import SampleSourceError

    parity_batch = data = None
    if args.parity_data is not None:  # the bundle's own golden set always gates the engine; this adds a check
        try:
            parity_batch, data = _parity_batch(args)
        except (SampleSourceError, ValueError) as exc:
            return _fail(EXIT_USAGE, str(exc))
    from lungseg.tensorrt_build import EngineBuildError

    from .bundle_writer import engine_with_parity

    cache = args.state / "engines" if args.state is not None else None
    try:
        report = engine_with_parity(bundle, _options(args, settings), engine_cache=cache, force=args.force,
                                    batch=parity_batch, data=data, checkpoint=args.checkpoint)
    except EngineBuildError as exc:
        return _fail(EXIT_ENGINE_IMPOSSIBLE, f"engine not usable: {exc}")
    _print_engine_report(report, args.json)
    return EXIT_OK if report["passed"] else EXIT_PARITY_FAILED


def _print_engine_report(report: dict[str, Any], as_json: bool) -> None:
    import json

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
    import json

    from .parity import ParityResult, format_table

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
