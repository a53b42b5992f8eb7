"""``lungseg-segment``: segment PNG/JPEG/DICOM files to mask PNGs with an ONNX model."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_MODEL = 3

log = logging.getLogger("lungseg.segment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungseg-segment",
        description="Segment the lungs in chest radiographs (PNG, JPEG or DICOM). Writes "
        "<stem>_mask.png (uint8 0/255, native size) per input and one JSON line per input.",
        epilog=f"Exit codes: {EXIT_OK} all done, {EXIT_SOME_FAILED} some inputs unreadable, "
        f"{EXIT_USAGE} usage error, {EXIT_NO_MODEL} no usable model.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image or DICOM files")
    parser.add_argument("--out", type=Path, required=True, help="output folder for mask PNGs")
    parser.add_argument("--model", type=Path, default=None,
                        help="ONNX file or bundle folder (default: the shipped model)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="probability threshold (default: from the model, else 0.5)")
    parser.add_argument("--no-postprocess", action="store_true",
                        help="threshold only: keep all components and holes")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write the JSON lines here instead of stdout")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import cv2

    from lungseg.bundle import ModelNotFoundError, resolve_bundle
    from lungseg.imaging import UnreadableImageError, read_image
    from lungseg.inference import lung_areas, segment_batch
    from lungseg.postprocess import PostprocessConfig
    from lungseg.predictors import OnnxRuntimePredictor

    try:
        bundle = resolve_bundle(args.model)
    except ModelNotFoundError as exc:
        log.error("%s", exc)
        return EXIT_NO_MODEL
    predictor = OnnxRuntimePredictor(str(bundle.onnx), threads=args.threads)
    threshold = args.threshold if args.threshold is not None else float(bundle.metadata.get("threshold", 0.5))
    config = (PostprocessConfig(threshold=threshold, keep_components=0, fill_holes=False)
              if args.no_postprocess else PostprocessConfig(threshold=threshold))
    args.out.mkdir(parents=True, exist_ok=True)
    sink = args.json.open("w") if args.json else sys.stdout
    failures = 0
    try:
        for path in args.inputs:
            t0 = time.perf_counter()
            try:
                radiograph = read_image(path)
            except UnreadableImageError as exc:
                log.error("%s", exc)
                failures += 1
                print(json.dumps({"input": str(path), "error": exc.reason}), file=sink, flush=True)
                continue
            decode_ms = (time.perf_counter() - t0) * 1000
            result = segment_batch(predictor, [radiograph], config)[0]
            out_path = args.out / f"{path.stem}_mask.png"
            if not cv2.imwrite(str(out_path), result.mask.astype("uint8") * 255):
                log.error("%s: could not write %s", path, out_path)
                failures += 1
                continue
            record = {
                "input": str(path),
                "mask": str(out_path),
                "rows": radiograph.shape[0],
                "columns": radiograph.shape[1],
                **lung_areas(result.mask, radiograph.pixel_spacing_mm),
                "pixel_spacing_mm": list(radiograph.pixel_spacing_mm) if radiograph.pixel_spacing_mm else None,
                "model": bundle.name,
                "model_version": bundle.version,
                "timings_ms": {"decode": decode_ms, **result.timings_ms},
                **result.qa,
            }
            print(json.dumps(record), file=sink, flush=True)
    finally:
        if args.json:
            sink.close()
    return EXIT_SOME_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
