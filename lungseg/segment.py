"""``lungseg-segment``: segment PNG/JPEG/DICOM files to mask PNGs with an ONNX model."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lungseg.bundle import ModelNotFoundError, resolve_bundle
from lungseg.gate_options import add_gate_arguments, legacy_auto_orient

if TYPE_CHECKING:  # imported lazily at run time: `lungseg-segment --help` stays instant
    from lungseg.bundle import Bundle
    from lungseg.inference import Segmentation
    from lungseg.measurement import MaskMeasurement
    from lungseg.radiograph import Radiograph

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_MODEL = 3

#: the JSON line's layout; its area keys are the edge sidecar's (lungseg.inference.named_lung_areas)
RESULT_SCHEMA = "lungseg-segment/line/2"
log = logging.getLogger("lungseg.segment")
_PASSTHROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, not {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _failure_reason(path: Path, exc: BaseException) -> str:
    """Why one input failed, without values from inside the file."""
    from lungseg.imaging import UnreadableImageError  # cv2 + pydicom (~0.2 s): not for --help; main has it loaded

    if isinstance(exc, UnreadableImageError):
        return exc.reason
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"cannot be processed ({type(exc).__name__})"


def _write_dicom_results(folder: Path, stem: str, radiograph: Radiograph, segmentation: Segmentation,
                         measured: MaskMeasurement, bundle: Bundle, threshold: float) -> dict[str, str] | None:
    """``<stem>.seg.dcm`` and ``<stem>.sr.dcm`` in ``folder`` for a DICOM input (``None`` for an image file)."""
    from lungseg import dicom_out, dicom_results
    from lungseg.atomic import atomic_write

    if radiograph.dataset is None:
        return None
    provenance = dicom_out.Provenance.of(bundle, Path(bundle.onnx), "cpu", "fp32", threshold)
    reference, _ = dicom_out.reference_dataset(radiograph.dataset)
    seg = dicom_results.segmentation(reference, segmentation, measured.review_text(), provenance)
    sr = dicom_results.measurement_report(reference, radiograph, measured, seg, provenance)
    written = {}
    for kind, dataset in (("seg", seg), ("sr", sr)):
        target = folder / f"{stem}.{kind}.dcm"
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        atomic_write(target, buffer.getvalue())
        written[kind] = str(target)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungseg-segment",
        description="Segment the lungs in chest radiographs (PNG, JPEG or DICOM). Writes "
        "<stem>_mask.png (uint8 0/255, native size) per input and one JSON line per input.",
        epilog=f"Exit codes: {EXIT_OK} all done, {EXIT_SOME_FAILED} some inputs unreadable or refused by the "
        f"image gate (their JSON line says why), {EXIT_USAGE} usage error, {EXIT_NO_MODEL} no usable model.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image or DICOM files")
    parser.add_argument("--out", type=Path, required=True, help="output folder for mask PNGs")
    parser.add_argument("--dicom-out", type=Path, default=None, metavar="DIR",
                        help="for DICOM inputs, also write <stem>.seg.dcm (DICOM Segmentation) and <stem>.sr.dcm "
                        "(TID 1500 Measurement Report referencing it: areas, QA flags, the model), as lungseg-edge "
                        "writes them")
    parser.add_argument("--model", type=Path, default=None,
                        help="ONNX file or bundle folder (default: the shipped model)")
    parser.add_argument("--threshold", type=_probability, default=None,
                        help="probability threshold (default: from the model, else 0.5)")
    parser.add_argument("--no-postprocess", action="store_true",
                        help="threshold only: keep all components and holes")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="JSON lines on stdout (the default; the switch every lungseg command takes)")
    output.add_argument("--json-out", type=Path, default=None, metavar="PATH",
                        help="write the JSON lines to PATH instead of stdout")
    parser.add_argument("--threads", type=_positive_int, default=None, help="onnxruntime intra-op threads")
    add_gate_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, legacy = legacy_auto_orient(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if legacy:
        log.warning("--auto-orient on|off is deprecated and goes in the next release: use --auto-orient or "
                    "--no-auto-orient")
    if args.json and any(path.suffix in (".json", ".jsonl") for path in args.inputs):
        parser.error("--json is a switch now (JSON lines on stdout); write them to a file with --json-out PATH")
    # not at module top: with them `lungseg-segment --help` takes ~0.35 s instead of ~0.06 s
    import cv2  # ~60 ms alone

    from lungseg.gate import Refused, gated_segment, load_gate, policy_from_settings  # cv2, numpy, inference
    from lungseg.imaging import UnreadableImageError, read_image  # pydicom and decoders (~0.15 s)
    from lungseg.measurement import measure_mask  # numpy, the spacing check
    from lungseg.plausibility import load_shape_model  # numpy
    from lungseg.postprocess import PostprocessConfig  # cv2, numpy
    from lungseg.predictors import OnnxRuntimePredictor  # onnxruntime (~90 ms alone)

    try:
        bundle = resolve_bundle(args.model)
    except ModelNotFoundError as exc:
        log.error("%s", exc)
        return EXIT_NO_MODEL
    predictor = OnnxRuntimePredictor(str(bundle.onnx), threads=args.threads)
    policy = policy_from_settings(args)
    gate = load_gate(bundle.root) if policy.mode != "off" else None
    shape_model = load_shape_model(bundle.root)
    threshold = args.threshold if args.threshold is not None else float(bundle.metadata.get("threshold", 0.5))
    config = (PostprocessConfig(threshold=threshold, keep_components=0, fill_holes=False)
              if args.no_postprocess else PostprocessConfig(threshold=threshold))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.dicom_out is not None:
            args.dicom_out.mkdir(parents=True, exist_ok=True)
        sink = args.json_out.open("w") if args.json_out else sys.stdout
    except OSError as exc:
        log.error("cannot create the output %s: %s", exc.filename or args.out, exc.strerror or exc)
        return EXIT_USAGE
    failures = 0
    try:
        for path in args.inputs:
            t0 = time.perf_counter()
            try:  # one input's failure (even a native decoder's panic) never stops the others
                if path.is_dir():
                    raise UnreadableImageError(path, "is a directory, not an image file")
                radiograph = read_image(path)
                decode_ms = (time.perf_counter() - t0) * 1000
                result = gated_segment(predictor, gate, [radiograph], config, policy, shape_model)[0]
                if isinstance(result, Refused):
                    raise UnreadableImageError(path, f"refused ({result.code}): {result.message}")
                out_path = args.out / f"{path.stem}_mask.png"
                if not cv2.imwrite(str(out_path), result.mask.astype("uint8") * 255):
                    raise OSError(f"could not write {out_path}")
                measured = measure_mask(radiograph, result, native_areas=True)
                dicom_files = (_write_dicom_results(args.dicom_out, path.stem, radiograph, result, measured, bundle,
                                                    threshold)
                               if args.dicom_out is not None else None)
            except _PASSTHROUGH:
                raise
            except BaseException as exc:
                reason = _failure_reason(path, exc)
                log.error("%s: %s", path, reason)
                failures += 1
                print(json.dumps({"input": str(path), "error": reason}), file=sink, flush=True)
                continue
            record = {
                "schema": RESULT_SCHEMA,
                "input": str(path),
                "mask": str(out_path),
                "rows": radiograph.shape[0],
                "columns": radiograph.shape[1],
                **measured.areas,
                "pixel_spacing_mm": list(radiograph.pixel_spacing_mm) if radiograph.pixel_spacing_mm else None,
                "model": bundle.name,
                "model_version": bundle.version,
                "bundle_sha256": bundle.sha256,
                "device_uid": bundle.device_uid,
                "timings_ms": {"decode": decode_ms, **result.timings_ms},
                **measured.qa,
                **({"dicom": dicom_files} if args.dicom_out is not None else {}),
            }
            print(json.dumps(record), file=sink, flush=True)
    finally:
        if args.json_out:
            sink.close()
    return EXIT_SOME_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
