"""``lungseg-bench``: parity and speed of every backend a model bundle can run on, and a verdict.

This module parses the arguments and turns the run's verdict into an exit code; the run itself is
:mod:`lungseg.benchmarks.runner`, imported once the arguments are valid (so ``--help`` and usage
errors load nothing heavy).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from .acceptance import BOUNDS, Bound, describe, parse_bounds

EXIT_OK = 0
EXIT_PARITY_FAILED = 1
EXIT_USAGE = 2
EXIT_ACCEPTANCE_FAILED = 3
EXIT_INTERNAL = 70  # EX_SOFTWARE: a crash, never a verdict

DEFAULT_IMAGES = 20

log = logging.getLogger("lungseg.bench")

_ROWS = "\n".join(f"  {name} {bound.text()}: {bound.what}" for name, bound in BOUNDS.items())
EPILOG = f"""\
backends: pytorch (the bundle's checkpoint.pt or --checkpoint; needs the [train] extra), onnxruntime-cpu,
  onnxruntime-fp16, onnxruntime-int8, onnxruntime-cuda, tensorrt-fp16; absent ones are listed with the reason.
reference: pytorch where it is available, else onnxruntime-cpu (the fp32 ONNX); the report and --json
  say which. Every backend is also checked against the bundle's golden set (golden.npz: the fp32 PyTorch
  probabilities recorded by lungseg-export), so a runtime-only install (no torch, tqdm or onnx) still
  checks against PyTorch's numbers.
parity gate: mean mask Dice vs the reference and vs the golden set >= --min-dice-fp32 (fp32 backends,
  default 0.999) or --min-dice-reduced (fp16/int8, default 0.99); the DICOM path's native-size mask vs
  the 0.1.0 path >= --min-dice-dicom (default 0.995).
DICOM path: every DICOM file (from --dicom, else --data when it is a DICOM folder, else ../shared/data/dicom
  beside the source tree, else files generated from the images) --copies times through
  `lungseg-edge run --once --batch-size 1 --backend cpu`, with the defaults and with the 0.1.0 path
  (--decode-min-side 0 --postprocess-resolution native --sc-syntax rle --sc-verify decode); per-stage
  medians and non-inference/inference ratios. Burst: --burst small (512 px) uncompressed files through one
  --once run, both ways: throughput ratio and the daemon's peak RSS. CPU feature flags go with every figure.
acceptance rows (default bounds; --bound ROW=VALUE moves one for this run, e.g. on a loaded machine):
{_ROWS}
  A row whose measurement was skipped (--skip-e2e, --burst 0, no PyTorch) is reported as not measured.
exit codes:
  {EXIT_OK}  passed: every parity gate and every measured acceptance row held
  {EXIT_PARITY_FAILED}  a parity gate failed (a backend vs the reference or the golden set, or the DICOM mask)
  {EXIT_USAGE}  usage error: bad arguments, unusable data or no usable model bundle
  {EXIT_ACCEPTANCE_FAILED}  parity held but an acceptance row failed (the rows are named on stderr and in the report)
  {EXIT_INTERNAL} internal error: lungseg-bench crashed (traceback on stderr)
  When both parity and an acceptance row fail, the exit code is {EXIT_PARITY_FAILED}.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungseg-bench",
        description="Benchmark a lungseg model bundle: parity of every available backend against PyTorch (or the "
        "fp32 ONNX) and the bundle's golden set, latency per pipeline stage and batch size, a FLOP/GEMM latency "
        "floor, end-to-end DICOM throughput through lungseg-edge, and a verdict on the acceptance rows.",
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
                        help="images for parity and latency (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write the full result as JSON (publish it with python -m lungseg.benchmarks.readme)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="write a Markdown report")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH",
                        help="write a latency plot (PNG; needs matplotlib, the [train] extra)")
    parser.add_argument("--bound", action="append", default=[], metavar="ROW=VALUE",
                        help="move one acceptance row's bound for this run (repeatable; rows below)")
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
    parser.add_argument("--cpu-rounds", type=int, default=10, metavar="R",
                        help="interleaved rounds of the CPU backends' side-by-side table (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _out(text: str) -> None:
    """The CLI's report output (stdout)."""
    print(text)


def _err(text: str) -> None:
    print(f"lungseg-bench: {text}", file=sys.stderr)


def exit_code(verdict: dict[str, Any]) -> int:
    """Parity failure outranks an acceptance failure; see the exit codes in the epilog."""
    if verdict["parity_failed"]:
        return EXIT_PARITY_FAILED
    return EXIT_ACCEPTANCE_FAILED if verdict["acceptance_failed"] else EXIT_OK


def _summary(result: dict[str, Any], code: int) -> str:
    """One line for stderr: the verdict, its exit code and the failed (and unmeasured) rows by name."""
    verdict, parts = result["verdict"], []
    if verdict["parity_failed"]:
        parts.append("parity failed: " + ", ".join(verdict["parity_failed"]))
    if verdict["acceptance_failed"]:
        parts.append("acceptance rows failed: " + ", ".join(describe(name, result["acceptance"][name])
                                                            for name in verdict["acceptance_failed"]))
    if verdict["not_measured"]:
        parts.append("not measured: " + ", ".join(verdict["not_measured"]))
    return f"{'PASSED' if code == EXIT_OK else 'FAILED'} (exit {code})" + "".join(f"; {p}" for p in parts)


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Bound]]:
    """Arguments and acceptance bounds; a usage error exits with EXIT_USAGE (argparse's 2)."""
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
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib (the [train] extra)")
    try:
        bounds = parse_bounds(args.bound)
    except ValueError as exc:
        parser.error(str(exc))
    return args, bounds


def _run(args: argparse.Namespace, bounds: dict[str, Bound]) -> int:
    # late on purpose: numpy, onnxruntime, OpenCV and pydicom (~0.4 s) that --help and usage errors never need
    from . import runner

    try:
        bundle, samples = runner.load_inputs(args)
    except runner.UNUSABLE_INPUT as exc:
        _err(str(exc))
        return EXIT_USAGE
    result = runner.run(args, bundle, samples, bounds)
    code = result["verdict"]["exit_code"] = exit_code(result["verdict"])
    _out(runner.text_report(result))
    runner.write_files(result, json_path=args.json, markdown=args.markdown, plot=args.plot)
    _err(_summary(result, code))
    return code


def main(argv: list[str] | None = None) -> int:
    args, bounds = _parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args, bounds)
    except Exception:  # a crash is exit 70, never mistaken for a verdict (1/3) or a usage error (2)
        log.exception("internal error")
        _err(f"internal error (exit {EXIT_INTERNAL}): lungseg-bench crashed; the traceback is above")
        return EXIT_INTERNAL
