"""``lungseg-export``: a training checkpoint -> a validated model bundle folder.

Only the parser lives here; the work is :mod:`lungseg.export.commands`, imported once a command
runs (torch, onnx, onnxruntime, tensorrt and numpy cost 75 ms to 2 s each), so ``--help`` stays
instant (~0.05 s; with them at the top it takes ~2.5 s).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lungseg.export.exit_codes import (
    EXIT_CHECKPOINT,
    EXIT_ENGINE_IMPOSSIBLE,
    EXIT_EXPORT_FAILED,
    EXIT_OK,
    EXIT_PARITY_FAILED,
    EXIT_USAGE,
)

DEFAULT_MAX_IMAGES = 64

log = logging.getLogger("lungseg.export")

EPILOG = f"""\
outputs (in --out): model.onnx (fp32), model.fp16.onnx (--fp16), model.int8.onnx (--int8),
  model.openvino.int8.xml/.bin (--openvino: NNCF int8, calibration patients never in the parity set),
  model.engine + engine.json (--fp16/--engine where TensorRT and a CUDA GPU are present),
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
    parser.add_argument("--openvino", action="store_true",
                        help="also write model.openvino.int8.xml/.bin: NNCF post-training int8 (performance preset) "
                        "for the OpenVINO CPU backend, calibrated on --calibration MANIFEST patients absent from the "
                        "parity set (needs the [openvino] extra and nncf)")
    parser.add_argument("--engine", action="store_true",
                        help=f"like --fp16, but the TensorRT engine is required (exit {EXIT_ENGINE_IMPOSSIBLE} "
                        "if it cannot be built here)")
    parser.add_argument("--engine-only", type=Path, metavar="BUNDLE", default=None,
                        help="build (or rebuild) the TensorRT engine of an existing bundle, on the device")
    parser.add_argument("--calibration", type=Path, metavar="MANIFEST_OR_DIR", default=None,
                        help="int8 calibration radiographs (default: the committed fixtures)")
    parser.add_argument("--parity-data", type=Path, metavar="MANIFEST_OR_DIR", default=None,
                        help="parity radiographs. Default for an export: tests/fixtures/cxr/manifest.csv, present "
                        "only in a source checkout (an installed lungseg exits 2 and asks for this flag); with "
                        "--engine-only: none, the bundle's own golden set (golden.npz) alone gates the engine")
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
                        help="build for DLA core N (Jetson AGX/NX Orin): a static one-image engine (the DLA runs "
                        "static shapes only; --profile is ignored), GPU fallback for unsupported layers, the "
                        "layer placement logged; the service uses it with dla_core = N")
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
    parser.add_argument("--model-version", default=None, metavar="X.Y.Z",
                        help="the bundle's one model version, written into every model's ONNX metadata and "
                        "bundle.json, and named by every output (default: the checkpoint's)")
    parser.add_argument("--gate-checkpoint", type=Path, default=None, metavar="GATE_PT",
                        help="also add the image gate: gate.pt from lungseg-train gate (its shape_model.npz beside "
                        "it); gate.onnx, shape_model.npz and gate.json go into the bundle after a parity check")
    parser.add_argument("--shape-model", type=Path, default=None, metavar="NPZ",
                        help="the mask shape model to add with --gate-checkpoint (default: shape_model.npz beside "
                        "the gate checkpoint)")
    parser.add_argument("--gate-only", action="store_true",
                        help="with --gate-checkpoint and --out: replace the gate (and shape model) of the existing "
                        "bundle in --out, leaving its segmenter models untouched; bundle.json is rewritten")
    parser.add_argument("--drift-reference", type=Path, default=None, metavar="MANIFEST",
                        help="also write drift_reference.json (the drift monitor's reference: descriptors of these "
                        "training images, binned) into the bundle; with --drift-only, into the existing bundle in "
                        "--out, nothing else (bundle.json is rewritten)")
    parser.add_argument("--drift-only", action="store_true", help="with --drift-reference and --out: see above")
    parser.add_argument("--drift-max-images", type=int, default=None, metavar="N",
                        help="use at most N images of --drift-reference (default: all)")
    parser.add_argument("--json", action="store_true", help="print the parity report as JSON on stdout")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.engine_only is None and args.out is None:
        parser.error("--out DIR is required (or --engine-only BUNDLE)")
    if args.engine_only is not None and (args.out is not None or args.int8 or args.fp16 or args.openvino):
        parser.error("--engine-only works on an existing bundle: drop --out/--fp16/--int8")
    if args.max_images < 1:
        parser.error("--max-images must be >= 1")
    from lungseg.export import commands  # onnxruntime, numpy, image decoding (~0.5 s): not for --help

    return commands.run(args, parser)
