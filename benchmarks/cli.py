"""``lungseg-bench``: parity and speed of every backend a model bundle can run on.

Only the standard library is imported at module level, so ``--help`` is instant.
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
EXIT_NO_MODEL = 3

DEFAULT_IMAGES = 20

log = logging.getLogger("lungseg.bench")

EPILOG = f"""\
backends: pytorch (the bundle's checkpoint.pt or --checkpoint; the reference), onnxruntime-cpu,
  onnxruntime-fp16, onnxruntime-int8, onnxruntime-cuda, tensorrt-fp16; absent ones are listed with the reason.
parity gate: mean mask Dice vs the reference >= --min-dice-fp32 (fp32 backends, default 0.999) or
  --min-dice-reduced (fp16/int8, default 0.99).
DICOM path: every DICOM file (from --dicom, else --data when it is a DICOM folder, else ../shared/data/dicom
  beside the source tree, else files generated from the images) --copies times through
  `lungseg-edge run --once --batch-size 1 --backend cpu`, with the defaults and with the 0.1.0 path
  (--decode-min-side 0 --postprocess-resolution native --sc-syntax rle --sc-verify decode); per-stage
  medians and non-inference/inference ratios. Burst: --burst small (512 px) uncompressed files through one
  --once run, both ways: throughput ratio and the daemon's peak RSS. Mask parity: the default path's
  native-size mask against the 0.1.0 path's (mean Dice >= 0.995). CPU feature flags go with every figure.
exit codes: {EXIT_OK} ok; {EXIT_PARITY_FAILED} a backend missed its parity gate; {EXIT_USAGE} usage error or unusable
  data; {EXIT_NO_MODEL} no usable model bundle.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungseg-bench",
        description="Benchmark a lungseg model bundle: parity of every available backend against PyTorch, "
        "latency per pipeline stage and batch size, a FLOP/GEMM latency floor, and end-to-end DICOM "
        "throughput through lungseg-edge.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=None, metavar="BUNDLE",
                        help="bundle folder (default: the shipped model)")
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="PT",
                        help="PyTorch checkpoint for the reference (default: BUNDLE/checkpoint.pt)")
    parser.add_argument("--data", type=Path, default=None, metavar="MANIFEST_OR_DICOM_DIR",
                        help="radiographs: a manifest CSV (with masks) or a folder of PNG/DICOM files "
                        "(default: the committed fixtures tests/fixtures/cxr)")
    parser.add_argument("--dicom", type=Path, default=None, metavar="DIR",
                        help="DICOM files for decode timing and the end-to-end burst")
    parser.add_argument("-n", type=int, default=DEFAULT_IMAGES, metavar="N",
                        help="images for parity and latency, and files in the burst (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the full result as JSON")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="write a Markdown report")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH", help="write a latency plot (PNG)")
    parser.add_argument("--readme", type=Path, default=None, metavar="README",
                        help="regenerate the performance section of this README (between its markers) from the "
                        "result; needs --json (the section cites it)")
    parser.add_argument("--min-dice-dicom", type=float, default=None, metavar="D",
                        help="gate on the DICOM path's native-size mask vs the 0.1.0 path (mean Dice, default: 0.995)")
    parser.add_argument("--min-dice-fp32", type=float, default=None, metavar="D",
                        help="parity gate for fp32 backends (default: 0.999)")
    parser.add_argument("--min-dice-reduced", type=float, default=None, metavar="D",
                        help="parity gate for fp16/int8 backends (default: 0.99)")
    parser.add_argument("--skip-e2e", action="store_true",
                        help="skip everything that runs lungseg-edge (DICOM stage tables and the burst)")
    parser.add_argument("--copies", type=int, default=7, metavar="K",
                        help="copies of each DICOM file in the stage runs (median per stage; default: %(default)s)")
    parser.add_argument("--burst", type=int, default=200, metavar="N",
                        help="small files in the burst (default: %(default)s; 0 skips it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and onnxruntime alike (default: all usable cores)")
    parser.add_argument("--batch-sizes", default="1,4,8", metavar="B,B,...",
                        help="batch sizes for inference latency (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, metavar="R",
                        help="timed runs per batch size (default: enough for ~8 images, at least 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _dicom_files(args: argparse.Namespace, images: list[Any], work: Path) -> tuple[list[Path], str]:
    """DICOM files for the stage tables and parity, and where they came from (generated when none)."""
    from lungseg.export.samples import DICOM_SUFFIXES, SHARED_DICOM_DIR, describe_source

    from .dicom_samples import generated_set

    for folder in (args.dicom, args.data, SHARED_DICOM_DIR):
        if folder is not None and folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in DICOM_SUFFIXES)
            if files:
                return files, describe_source(folder)
    return generated_set(images, work / "generated"), "generated from the benchmark images"


def _name(path: Path | None) -> str | None:
    return path.name if path is not None else None


def _dicom_path(args: argparse.Namespace, bundle: Any, predictor: Any, images: list[Any], threads: int,
                work: Path) -> dict[str, Any]:
    """Stage tables, burst, mask parity and acceptance of the DICOM edge path."""
    from . import dicom_path
    from .dicom_samples import BIG_J2K, BIG_UNCOMPRESSED, GENERATED, pick, small_set

    dicoms, source = _dicom_files(args, images, work)
    result: dict[str, Any] = {"source": source, "files": [p.name for p in dicoms]}
    gate = dicom_path.ACCEPT_MASK_DICE if args.min_dice_dicom is None else args.min_dice_dicom
    from lungseg.gate import load_gate

    result["mask_parity"] = dicom_path.mask_parity(dicoms, predictor, min_dice=gate,
                                                   gate=load_gate(getattr(bundle, "root", None)))
    if args.skip_e2e:
        result["stages"] = result["burst"] = {"skipped": "--skip-e2e"}
    else:
        result["stages"] = dicom_path.stage_comparison(dicoms, bundle.root, copies=args.copies, threads=threads)
        result["burst"] = (dicom_path.burst_comparison(small_set(images, work / "small"), args.burst, bundle.root,
                                                       threads=threads)
                           if args.burst > 0 else {"skipped": "--burst 0"})
    result["acceptance"] = dicom_path.acceptance(result["stages"], result["burst"], result["mask_parity"],
                                                 _name(pick(dicoms, BIG_J2K, GENERATED[0][0])),
                                                 _name(pick(dicoms, BIG_UNCOMPRESSED, GENERATED[1][0])))
    return result


def _compute(bundle: Any, backends: dict[str, Any], threads: int) -> dict[str, Any]:
    from .compute import count_conv_flops, gemm_gflops, latency_floor

    try:
        from lungseg.model import UNet
    except ImportError as exc:
        return {"skipped": f"torch is not installed ({exc})"}
    reference = backends.get("pytorch")
    model = (reference.predictor.model if reference is not None and reference.available
             else UNet(init_features=int(bundle.metadata.get("init_features", 32))))
    flops = count_conv_flops(model)
    flops["init_features"] = int(model.encoder1.enc1conv1.weight.shape[0])
    flops["gemm_gflops"] = gemm_gflops(threads)
    flops.update(latency_floor(flops["flops"], flops["gemm_gflops"]))
    return flops


def run(args: argparse.Namespace) -> tuple[int, dict[str, Any] | None]:
    """The whole benchmark; returns the exit code and the result."""
    import tempfile
    from datetime import datetime, timezone

    import lungseg
    from lungseg.bundle import ModelNotFoundError, resolve_bundle
    from lungseg.export.parity import DEFAULT_MIN_DICE_FP32, DEFAULT_MIN_DICE_REDUCED
    from lungseg.export.samples import SampleSourceError, describe_source, load_samples, model_batch

    from . import latency, system
    from .backends import CHECKPOINT_NAME, CPU_FP32, REFERENCE, discover
    from .parity import run_parity

    try:
        bundle = resolve_bundle(args.model)
    except ModelNotFoundError as exc:
        print(f"lungseg-bench: {exc}", file=sys.stderr)
        return EXIT_NO_MODEL, None
    try:
        samples = load_samples(args.data, limit=args.n)
    except SampleSourceError as exc:
        print(f"lungseg-bench: {exc}", file=sys.stderr)
        return EXIT_USAGE, None
    threads = args.threads or system.usable_cores()
    progress = not args.no_progress and sys.stderr.isatty()
    min_fp32 = DEFAULT_MIN_DICE_FP32 if args.min_dice_fp32 is None else args.min_dice_fp32
    min_reduced = DEFAULT_MIN_DICE_REDUCED if args.min_dice_reduced is None else args.min_dice_reduced
    checkpoint = args.checkpoint or bundle.root / CHECKPOINT_NAME

    batch, geometries = model_batch(samples)
    # The DICOM edge path first, before PyTorch and the other backends are loaded: in service the
    # daemon runs alone (it never loads torch), and an idle 3 GB process beside it slowed the
    # daemon's JPEG 2000 decode by about a fifth on the machine the figures come from.
    from lungseg.predictors import OnnxRuntimePredictor

    with tempfile.TemporaryDirectory(prefix="lungseg-bench-") as tmp:
        dicom = _dicom_path(args, bundle, OnnxRuntimePredictor(str(bundle.onnx), device="cpu", threads=threads),
                            [s.pixels for s in samples], threads, Path(tmp))
    backends = {b.name: b for b in discover(bundle, checkpoint, threads)}
    parity = run_parity(list(backends.values()), batch, geometries, samples, min_dice_fp32=min_fp32,
                        min_dice_reduced=min_reduced, progress=progress)

    timing: dict[str, Any] = {"threads": threads, "batches": {}}
    from tqdm import tqdm

    available = [b for b in backends.values() if b.available]
    for backend in tqdm(available, desc="latency", unit="backend", disable=not progress):
        timing["batches"][backend.name] = latency.batch_latency(backend.predictor, batch, batch_sizes=args.batch_sizes,
                                                                repeats=args.repeats)
    compute = _compute(bundle, backends, threads)
    batches = timing["batches"]
    ort_p50 = batches.get(CPU_FP32, {}).get("1", {}).get("p50_ms")
    torch_p50 = batches.get(REFERENCE, {}).get("1", {}).get("p50_ms")
    acceptance = {"ort_cpu_p50_ms": ort_p50, "pytorch_p50_ms": torch_p50,
                  "ort_not_slower_than_pytorch": (ort_p50 <= torch_p50) if ort_p50 and torch_p50 else None}
    timing["memory"] = latency.peak_memory()
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lungseg_version": lungseg.__version__,
        "passed": parity["passed"] and dicom["mask_parity"]["passed"],
        "machine": system.machine(threads),
        "versions": system.versions(),
        "model": {"bundle": describe_source(bundle.root), "name": bundle.name, "version": bundle.version,
                  "checkpoint": checkpoint.name if backends[REFERENCE].available else None},
        "data": {"source": describe_source(args.data), "n_images": len(samples),
                 "with_masks": parity["with_truth"]},
        "thresholds": {"fp32": min_fp32, "reduced": min_reduced},
        "backends": {name: b.describe() for name, b in backends.items()},
        "parity": parity,
        "latency": timing,
        "compute": compute,
        "acceptance": acceptance,
        "dicom_path": dicom,
    }
    return (EXIT_OK if result["passed"] else EXIT_PARITY_FAILED), result


def _write(result: dict[str, Any], args: argparse.Namespace) -> None:
    import json

    from .report import latency_plot, markdown_report, text_report

    print(text_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown_report(result) + "\n")
    if args.readme:
        from .readme import performance_section, splice

        section = performance_section(result, args.json.as_posix())
        args.readme.write_text(splice(args.readme.read_text(), section))
    if args.plot:
        latency_plot(result, args.plot)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of integers")
    if args.n < 1 or min(args.batch_sizes) < 1 or (args.repeats is not None and args.repeats < 1) or args.copies < 1:
        parser.error("-n, --batch-sizes, --repeats and --copies must be >= 1")
    if args.burst < 0:
        parser.error("--burst must not be negative")
    if args.readme and not args.json:
        parser.error("--readme needs --json (the README section names the JSON it comes from)")
    if args.readme and not args.readme.is_file():
        parser.error(f"--readme {args.readme}: no such file")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    code, result = run(args)
    if result is not None:
        _write(result, args)
    return code
