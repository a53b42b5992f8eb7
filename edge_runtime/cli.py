"""``lungseg-edge``: the DICOM folder-watching lung segmentation service.

Only the standard library is imported here; the model, DICOM and watching code
is imported when a command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_CODES = """exit codes:
  0   done (run: stopped by SIGTERM/SIGINT, or --once finished with nothing quarantined)
  1   run --once: some inputs were quarantined; render: input unreadable
  2   usage or configuration error
  3   no usable model (--model missing or not loadable, no shipped default)
  4   the requested --backend cannot run here
  5   output/state folder unusable, or another lungseg-edge holds the state folder
  70  internal error (systemd restarts the service)"""

OUTPUTS = """outputs, per processed input (folder per study):
  <out>/<StudyInstanceUID>/<SOPInstanceUID>.sc.dcm   overlay Secondary Capture (RGB, RLE Lossless)
  <out>/<StudyInstanceUID>/<SOPInstanceUID>.seg.dcm  DICOM Segmentation (with --seg)
  <out>/<StudyInstanceUID>/<SOPInstanceUID>.json     sidecar: areas, QA flags, timings, model
  (SOPInstanceUID = the source's; the DICOM objects get derived UIDs of their own)
  <state>/ledger.sqlite3, <state or out>/quarantine/<name> + <name>.reason.json"""


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="watch a folder and segment every chest radiograph that arrives",
        description="Watch a folder for DICOM chest radiographs (CR, DX For Presentation) and write an "
        "overlay Secondary Capture, optionally a DICOM Segmentation, and a JSON sidecar for each. "
        "Settings come from --config (TOML, same names with underscores), overridden by flags.",
        epilog=OUTPUTS + "\n\n" + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # every default is None, so only flags actually given override the config file
    p.add_argument("--watch", type=Path, metavar="DIR",
                   help="folder to watch (never modified, except --quarantine-mode move)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder")
    p.add_argument("--state", type=Path, metavar="DIR",
                   help="ledger/quarantine folder (default: ledger in <out>/.lungseg-state, quarantine in "
                   "<out>/quarantine)")
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML config file (see packaging/lungseg-edge.toml)")
    p.add_argument("--backend", choices=("auto", "tensorrt", "cuda", "cpu"),
                   help="inference backend (default auto: TensorRT -> CUDA -> CPU)")
    p.add_argument("--model", type=Path, metavar="BUNDLE",
                   help="model bundle folder or .onnx file (default: the shipped model)")
    p.add_argument("--seg", action=argparse.BooleanOptionalAction, default=None,
                   help="also write a DICOM Segmentation")
    p.add_argument("--once", action=argparse.BooleanOptionalAction, default=None,
                   help="process what is in the folder, then exit")
    p.add_argument("--polling", action=argparse.BooleanOptionalAction, default=None,
                   help="poll the folder instead of inotify (network shares: NFS, SMB)")
    p.add_argument("--poll-interval", type=float, metavar="S", help="seconds between polls (default 2)")
    p.add_argument("--stable-seconds", type=float, metavar="S",
                   help="size/mtime must stay unchanged this long when no close event is seen (default 2)")
    p.add_argument("--batch-size", type=int, metavar="N", help="most files per inference batch (default 4)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU inference threads (default: onnxruntime's)")
    p.add_argument("--threshold", type=float, metavar="P", help="probability threshold (default: model's, else 0.5)")
    p.add_argument("--quarantine-mode", choices=("copy", "move"),
                   help="copy (default) or move rejected inputs out of the watch folder")
    p.add_argument("--sc-syntax", choices=("rle", "explicit"),
                   help="SC transfer syntax: RLE Lossless (default) or Explicit VR Little Endian")
    p.add_argument("--forward-host", metavar="HOST",
                   help="also C-STORE the SC/SEG to this DICOM peer (needs pynetdicom)")
    p.add_argument("--forward-port", type=int, metavar="PORT", help="peer port (default 104)")
    p.add_argument("--forward-ae", metavar="AET", help="peer (called) AE title (default ANY-SCP)")
    p.add_argument("--forward-calling-ae", metavar="AET", help="our (calling) AE title (default LUNGSEG)")
    p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None,
                   help="one JSON object per log line")
    p.add_argument("--log-uids", action=argparse.BooleanOptionalAction, default=None,
                   help="log DICOM UIDs in clear (default: hashed)")
    p.add_argument("-v", "--verbose", action="count", default=None, help="more logging (-vv: libraries too)")


def _add_render(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render a DICOM (e.g. an output SC) to a PNG preview",
                       description="Write a DICOM image as PNG: an RGB Secondary Capture as it is, a "
                       "grayscale radiograph as displayed (MONOCHROME2, LUTs applied).",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, metavar="DICOM", nargs="?", help="the DICOM file to render")
    p.add_argument("--first", type=Path, metavar="DIR",
                   help="instead of DICOM: the first overlay SC (*.sc.dcm) found under this output folder")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--max-size", type=int, default=None, help="downscale so the long side is at most this")


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="counts from a state folder's ledger",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", type=Path, required=True, help="the --state folder (or <out>/.lungseg-state)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="copy sample DICOMs (pydicom-data) to DIR/watch and process them once",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="demo folder (watch/, out/ are made inside)")
    p.add_argument("--model", type=Path, metavar="BUNDLE", help="model bundle folder or .onnx file")
    p.add_argument("--backend", choices=("auto", "tensorrt", "cuda", "cpu"), default="auto")
    p.add_argument("--seg", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--extra", type=Path, action="append", default=[],
                   help="also copy the DICOM files in this folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungseg-edge",
        description="Lung segmentation of chest radiographs at the edge: watch a folder, write DICOM "
        "overlays/segmentations. Research use - not for diagnosis.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_render(sub)
    _add_status(sub)
    _add_demo(sub)
    return parser


RUN_SETTINGS = ("watch", "out", "state", "backend", "model", "seg", "once", "polling", "poll_interval",
                "stable_seconds", "batch_size", "threads", "threshold", "quarantine_mode", "sc_syntax",
                "forward_host", "forward_port", "forward_ae", "forward_calling_ae", "log_json", "log_uids",
                "verbose")


def config_from_args(args: argparse.Namespace):
    """The effective :class:`EdgeConfig`: defaults < ``--config`` file < flags."""
    from lungseg.edge_runtime.config import build_config, load_toml

    file_settings = load_toml(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in RUN_SETTINGS}
    return build_config(file_settings, flags)


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from lungseg.edge_runtime.config import ConfigError
    from lungseg.edge_runtime.logs import setup_logging

    try:
        config = config_from_args(args)
    except ConfigError as exc:
        setup_logging(bool(args.log_json), args.verbose or 0)
        logging.getLogger("lungseg.edge").error("configuration: %s", exc)
        return 2
    setup_logging(config.log_json, config.verbose, config.log_uids)
    from lungseg.edge_runtime.daemon import EXIT_INTERNAL, run

    try:
        return run(config)
    except Exception:
        logging.getLogger("lungseg.edge").exception("internal error", extra={"event": "crash"})
        return EXIT_INTERNAL


def cmd_render(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from lungseg.imaging import UnreadableImageError

    if (args.input is None) == (args.first is None):
        print("lungseg-edge render: give either a DICOM file or --first DIR", file=sys.stderr)
        return 2
    if args.first is not None:
        found = sorted(args.first.rglob("*.sc.dcm"))
        if not found:
            print(f"lungseg-edge render: no *.sc.dcm under {args.first}", file=sys.stderr)
            return 1
        args.input = found[0]
    try:
        from pydicom import dcmread

        ds = dcmread(args.input, force=True)
        if int(ds.get("SamplesPerPixel", 1)) == 3:
            rgb = ds.pixel_array
            if ds.get("PhotometricInterpretation", "RGB") != "RGB":
                from pydicom.pixels import convert_color_space

                rgb = convert_color_space(rgb, ds.PhotometricInterpretation, "RGB")
            image = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR)
        else:
            from lungseg.edge_runtime.overlay import to_gray8
            from lungseg.imaging import read_image

            image = to_gray8(read_image(args.input).pixels)
    except (UnreadableImageError, OSError, ValueError, AttributeError, RuntimeError) as exc:
        print(f"lungseg-edge render: {args.input.name}: cannot render ({exc})", file=sys.stderr)
        return 1
    if args.max_size and max(image.shape[:2]) > args.max_size:
        scale = args.max_size / max(image.shape[:2])
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                           interpolation=cv2.INTER_AREA)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), image):
        print(f"lungseg-edge render: could not write {args.out}", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json
    import sqlite3

    from lungseg.edge_runtime.ledger import LEDGER_NAME, Ledger

    if not (args.state / LEDGER_NAME).is_file():
        print(f"lungseg-edge status: no ledger in {args.state}", file=sys.stderr)
        return 5
    try:
        ledger = Ledger(args.state, readonly=True)
        counts = ledger.counts()
        ledger.close()
    except sqlite3.Error as exc:
        print(f"lungseg-edge status: cannot read the ledger: {exc}", file=sys.stderr)
        return 5
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        print(f"instances with outputs: {counts['instances']}")
        print(f"files done:             {counts['done']}")
        print(f"duplicates skipped:     {counts['duplicate']}")
        print(f"quarantined:            {counts['quarantined']}")
        for code, n in sorted(counts["quarantined_by_code"].items()):
            print(f"  {code}: {n}")
        print(f"last processed:         {counts['last_processed_at'] or '-'}")
        if counts["forward_pending"] or counts["forward_sent"]:
            print(f"forwarded:              {counts['forward_sent']} sent, {counts['forward_pending']} pending")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lungseg.edge_runtime.config import EdgeConfig
    from lungseg.edge_runtime.daemon import run
    from lungseg.edge_runtime.logs import setup_logging
    from lungseg.edge_runtime.samples import gather_samples

    setup_logging()
    watch = args.dir / "watch"
    copied = gather_samples(watch, extra_dirs=args.extra)
    if not copied:
        print("lungseg-edge demo: no sample DICOMs found (pip install pydicom-data)", file=sys.stderr)
        return 2
    print(f"copied {len(copied)} sample(s) to {watch}", file=sys.stderr)
    config = EdgeConfig(watch=watch, out=args.dir / "out", model=args.model, backend=args.backend,
                        seg=args.seg, once=True).validate()
    code = run(config)
    print(f"outputs in {args.dir / 'out'}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "render": cmd_render, "status": cmd_status, "demo": cmd_demo}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
