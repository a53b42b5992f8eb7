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
  5   output/state folder unusable, or another lungseg-edge holds the state or output folder
  6   run --once: some inputs were left undone (output disk full or unwritable, ...); run again
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
    p.add_argument("--gate", choices=("off", "flag", "refuse"),
                   help="image gate: off, flag (segment all, flag doubtful images) or refuse (default: also "
                   "quarantine non-chest images and header-declared non-chest body parts / lateral views)")
    p.add_argument("--auto-orient", action=argparse.BooleanOptionalAction, default=None,
                   help="correct confidently detected quarter turns and negatives (default: on)")
    for name, what in (("correct", "to correct orientation / negative (default 0.9)"),
                       ("uncertain", "below which a gate head is not confident (default 0.7)"),
                       ("mirror", "P(mirrored) above which an image is flagged (default 0.9)"),
                       ("refuse", "P(not a chest) above which an image is refused (default 0.9)")):
        p.add_argument(f"--gate-{name}-threshold", type=float, metavar="P", help=f"gate probability {what}")
    p.add_argument("--quarantine-mode", choices=("copy", "move"),
                   help="copy (default) or move rejected inputs out of the watch folder")
    p.add_argument("--sc-syntax", choices=("explicit", "rle", "jpegls"),
                   help="SC transfer syntax: explicit (Explicit VR Little Endian, uncompressed: the fastest; "
                   "default), rle (RLE Lossless) or jpegls (JPEG-LS Lossless: smallest, slowest)")
    p.add_argument("--sc-max-side", type=int, metavar="PX",
                   help="cap the SC's long side at PX pixels (default 0: the decoded image's size)")
    p.add_argument("--sc-verify", choices=("parse", "decode"),
                   help="check each written SC by parsing it and its pixel data length (parse, default) "
                   "or by decoding it and comparing every pixel (decode)")
    p.add_argument("--decode-min-side", type=int, metavar="PX",
                   help="decode and draw at the coarsest 1/2^k resolution whose short side is >= PX "
                   "(JPEG 2000: decoded at that level; default 256, the model's input size; 0: full resolution; "
                   "the SC is drawn at the decoded size, so 512 doubles its size for about 2x the decode time)")
    p.add_argument("--postprocess-resolution", choices=("model", "native"),
                   help="postprocess and measure at the model's resolution and upscale the mask once (model, "
                   "default) or at native size (native, slower)")
    p.add_argument("--forward-host", metavar="HOST",
                   help="also C-STORE the SC/SEG to this DICOM peer (needs pynetdicom)")
    p.add_argument("--forward-port", type=int, metavar="PORT", help="peer port (default 104)")
    p.add_argument("--forward-ae", metavar="AET", help="peer (called) AE title (default ANY-SCP)")
    p.add_argument("--forward-calling-ae", metavar="AET", help="our (calling) AE title (default LUNGSEG)")
    p.add_argument("--forward-retry-seconds", type=float, metavar="S",
                   help="first retry delay after a failed delivery, doubling up to an hour (default 60)")
    p.add_argument("--scp-port", type=int, metavar="PORT",
                   help="also receive images by DICOM C-STORE on this port (e.g. 11112), into the watch folder")
    p.add_argument("--scp-ae", metavar="AET", help="the receiver's AE title (default LUNGSEG)")
    p.add_argument("--scp-bind", metavar="ADDR",
                   help="address the receiver listens on (default 127.0.0.1; 0.0.0.0 for the network)")
    p.add_argument("--scp-allow", type=_ae_list, metavar="AET,AET",
                   help="calling AE titles allowed to send (default: any); others are rejected")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus /metrics and /healthz on this port (needs lungseg[metrics])")
    p.add_argument("--metrics-bind", metavar="ADDR", help="address of the metrics endpoint (default 127.0.0.1)")
    p.add_argument("--health-stale-seconds", type=float, metavar="S",
                   help="/healthz turns 503 when work waits and nothing succeeded for this long (default 600)")
    p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None,
                   help="one JSON object per log line")
    p.add_argument("--log-uids", action=argparse.BooleanOptionalAction, default=None,
                   help="log DICOM UIDs in clear (default: hashed)")
    p.add_argument("-v", "--verbose", action="count", default=None, help="more logging (-vv: libraries too)")


def _ae_list(text: str) -> list[str]:
    return [title.strip() for title in text.split(",") if title.strip()]


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


def _add_build_engine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-engine", help="build (or find) the TensorRT engine for this device into the state folder",
        description="Build the model's TensorRT FP16 engine for this exact device, check it against the bundle's "
        "reference outputs, and store it in <state>/engines where `run` finds it. Run it once at install (as the "
        "service user); the bundle itself is never written. An engine that fails its check is refused and recorded.",
        epilog="exit codes: 0 engine ready; 1 engine built but failed its parity check (refused); 2 usage error; "
        "3 no usable model; 4 TensorRT/CUDA not usable here", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, metavar="BUNDLE", help="model bundle folder (default: the shipped model)")
    p.add_argument("--state", type=Path, required=True, metavar="DIR",
                   help="the service's state folder (the engine goes to DIR/engines)")
    p.add_argument("--force", action="store_true", help="rebuild even if a checked engine (or a refusal) exists")
    p.add_argument("--dla-core", type=int, default=None, metavar="N",
                   help="build for DLA core N (Jetson AGX Orin / Orin NX), GPU fallback for the rest")
    p.add_argument("--json", action="store_true", help="print the engine record as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="show TensorRT's build progress")


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
    _add_build_engine(sub)
    _add_reprocess(sub)
    return parser


def _add_reprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reprocess", help="forget outputs deleted by hand, so the next run regenerates them",
                       description="Checks every instance the ledger lists against the output folder; where an "
                       "output file is missing, the instance is forgotten and its source (if still in the watch "
                       "folder) is processed again by the next run. Stop the service first (it holds the lock).",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the output folder")
    p.add_argument("--state", type=Path, default=None, help="the --state folder (default <out>/.lungseg-state)")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_reprocess(args: argparse.Namespace) -> int:
    import json

    from lungseg.edge_runtime.config import EdgeConfig
    from lungseg.edge_runtime.ledger import LEDGER_NAME, Ledger, LedgerLockedError, StateLock

    config = EdgeConfig(out=args.out, state=args.state)
    state = config.state_dir
    if not (state / LEDGER_NAME).is_file():
        print(f"lungseg-edge reprocess: no ledger in {state}", file=sys.stderr)
        return 5
    try:
        lock = StateLock(state).acquire()
    except LedgerLockedError as exc:
        print(f"lungseg-edge reprocess: {exc}", file=sys.stderr)
        return 5
    try:
        ledger = Ledger.open_or_rebuild(state, args.out, config.quarantine_dir)
        forgotten = ledger.forget_missing_outputs(args.out)
        ledger.close()
    finally:
        lock.release()
    if args.json:
        print(json.dumps({"forgotten": len(forgotten)}))
    else:
        print(f"{len(forgotten)} instance(s) with missing outputs forgotten; the next run processes their sources")
    return 0


RUN_SETTINGS = ("watch", "out", "state", "backend", "model", "seg", "once", "polling", "poll_interval",
                "stable_seconds", "batch_size", "threads", "threshold", "quarantine_mode", "sc_syntax",
                "sc_max_side", "sc_verify", "decode_min_side", "postprocess_resolution",
                "forward_host", "forward_port", "forward_ae", "forward_calling_ae", "log_json", "log_uids",
                "verbose", "forward_retry_seconds", "scp_port", "scp_ae", "scp_bind", "scp_allow", "metrics_port",
                "metrics_bind", "health_stale_seconds", "gate", "auto_orient", "gate_correct_threshold",
                "gate_uncertain_threshold", "gate_mirror_threshold", "gate_refuse_threshold")


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
    from lungseg.edge_runtime.backend_status import describe, read_backend_status

    backend = read_backend_status(args.state)
    if args.json:
        print(json.dumps({**counts, "backend": backend}, indent=2))
    else:
        for line in describe(backend) if backend else ["backend:                - (no backend.json yet)"]:
            print(line)
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


def cmd_build_engine(args: argparse.Namespace) -> int:
    import json
    import logging

    from lungseg.bundle import ModelNotFoundError, resolve_bundle
    from lungseg.predictors import BackendOptions, BackendUnavailableError

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        bundle = resolve_bundle(args.model)
    except ModelNotFoundError as exc:
        print(f"lungseg-edge build-engine: {exc}", file=sys.stderr)
        return 3
    from lungseg.tensorrt_runtime import ensure_engine

    from .sdnotify import extend_start_timeout

    options = BackendOptions(engine_cache=args.state / "engines", dla_core=args.dla_core,
                             build_keepalive=extend_start_timeout)
    try:
        path, manifest, where = ensure_engine(bundle, options, force=args.force)
    except BackendUnavailableError as exc:
        print(f"lungseg-edge build-engine: {exc}", file=sys.stderr)
        return 1 if "parity" in str(exc) else 4
    if args.json:
        print(json.dumps({"engine": str(path), "source": where, "manifest": manifest}, indent=2, default=str))
    else:
        parity = manifest.get("parity") or {}
        print(f"engine ready ({where}): {path}")
        print(f"TensorRT {manifest.get('tensorrt_version')}, {manifest.get('typing')}; parity on the golden set: "
              f"mean Dice {parity.get('dice_mean', float('nan')):.4f}, min {parity.get('dice_min', float('nan')):.4f}")
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
    handler = {"run": cmd_run, "render": cmd_render, "status": cmd_status, "demo": cmd_demo,
               "build-engine": cmd_build_engine, "reprocess": cmd_reprocess}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
