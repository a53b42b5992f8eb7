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
end to end: a burst of N DICOM copies (fresh UIDs) through `lungseg-edge run --once --backend cpu`;
  DICOMs from --dicom, else --data when it is a DICOM folder, else ../shared/data/dicom beside the source
  tree, else pydicom-data's RG1 samples.
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
    parser.add_argument("--min-dice-fp32", type=float, default=None, metavar="D",
                        help="parity gate for fp32 backends (default: 0.999)")
    parser.add_argument("--min-dice-reduced", type=float, default=None, metavar="D",
                        help="parity gate for fp16/int8 backends (default: 0.99)")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the lungseg-edge end-to-end run")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and onnxruntime alike (default: all usable cores)")
    parser.add_argument("--batch-sizes", default="1,4,8", metavar="B,B,...",
                        help="batch sizes for inference latency (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, metavar="R",
                        help="timed runs per batch size (default: enough for ~8 images, at least 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _dicom_files(args: argparse.Namespace) -> tuple[list[Path], str]:
    """DICOM files for decode timing and the burst, and where they came from."""
    from lungseg.export.samples import DICOM_SUFFIXES, SHARED_DICOM_DIR, describe_source

    for folder in (args.dicom, args.data, SHARED_DICOM_DIR):
        if folder is not None and folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in DICOM_SUFFIXES)
            if files:
                return files, describe_source(folder)
    try:
        from lungseg.edge_runtime.samples import sample_files
    except ImportError:
        return [], "none"
    return sample_files(), "pydicom-data RG1 samples"


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

    from . import end_to_end, latency, system
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
    backends = {b.name: b for b in discover(bundle, checkpoint, threads)}
    parity = run_parity(list(backends.values()), batch, geometries, samples, min_dice_fp32=min_fp32,
                        min_dice_reduced=min_reduced, progress=progress)

    dicoms, dicom_source = _dicom_files(args)
    timing: dict[str, Any] = {"threads": threads, "batches": {}}
    stage_backend = backends[CPU_FP32]
    with tempfile.TemporaryDirectory(prefix="lungseg-bench-") as tmp:
        timing["stage_backend"] = stage_backend.name
        timing["stages"] = latency.pipeline_latency(stage_backend.predictor, [s.path for s in samples], Path(tmp),
                                                    progress=progress)
    timing["dicom_decode"] = ({**latency.decode_latency(dicoms), "source": dicom_source} if dicoms
                              else {"skipped": "no DICOM files (pass --dicom DIR)"})
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
    if args.skip_e2e:
        e2e: dict[str, Any] = {"skipped": "--skip-e2e"}
    else:
        with tempfile.TemporaryDirectory(prefix="lungseg-e2e-") as tmp:
            e2e = end_to_end.run_burst(dicoms, args.n, bundle.root, Path(tmp), threads=threads)
        e2e["dicom_source"] = dicom_source
    timing["memory"] = latency.peak_memory()
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lungseg_version": lungseg.__version__,
        "passed": parity["passed"],
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
        "end_to_end": e2e,
    }
    return (EXIT_OK if parity["passed"] else EXIT_PARITY_FAILED), result


def _write(result: dict[str, Any], args: argparse.Namespace) -> None:
    import json

    from .report import latency_plot, markdown_report, text_report

    print(text_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown_report(result) + "\n")
    if args.plot:
        latency_plot(result, args.plot)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes {args.batch_sizes!r} is not a comma-separated list of integers")
    if args.n < 1 or min(args.batch_sizes) < 1 or (args.repeats is not None and args.repeats < 1):
        parser.error("-n, --batch-sizes and --repeats must be >= 1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    code, result = run(args)
    if result is not None:
        _write(result, args)
    return code
