"""``lungseg-edge``: the DICOM folder-watching lung segmentation service.

Only the standard library and the light edge modules (settings, ledger, logs) are imported here; the
model, DICOM, image and watching code (numpy, cv2, pydicom, onnxruntime: each import costs 20 ms to
0.5 s) is imported when a command runs, so ``--help`` stays instant (well under 0.1 s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sqlite3
import sys
import textwrap
from pathlib import Path

from lungseg.bundle import ModelNotFoundError, resolve_bundle
from lungseg.edge_runtime import audit, drift_report
from lungseg.edge_runtime.config import (
    BACKENDS,
    ConfigError,
    EdgeConfig,
    add_run_arguments,
    build_config,
    flag_settings,
    load_toml,
    sample_toml,
)
from lungseg.edge_runtime.fsio import sha256_of
from lungseg.edge_runtime.ledger import LEDGER_NAME, Ledger, LedgerLockedError, StateLock
from lungseg.edge_runtime.logs import setup_logging
from lungseg.edge_runtime.samples import gather_samples
from lungseg.edge_runtime.sdnotify import extend_start_timeout

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
  <out>/<StudyInstanceUID>/<SOPInstanceUID>.sc.dcm   overlay Secondary Capture (RGB, full resolution)
  <out>/<StudyInstanceUID>/<SOPInstanceUID>.seg.dcm  DICOM Segmentation (with --seg)
  <out>/<StudyInstanceUID>/<SOPInstanceUID>.sr.dcm   DICOM SR Measurement Report, TID 1500 (with the SEG)
  <out>/<StudyInstanceUID>/<SOPInstanceUID>.json     sidecar: areas, QA flags, timings, model
  (SOPInstanceUID = the source's; the DICOM objects get derived UIDs of their own)
  <state>/ledger.sqlite3, <state or out>/quarantine/<name> + <name>.reason.json"""


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="watch a folder and segment every chest radiograph that arrives",
        description=textwrap.fill(
            "Watch a folder for DICOM chest radiographs (CR, DX For Presentation) and write an overlay Secondary "
            "Capture, optionally a DICOM Segmentation, and a JSON sidecar for each. Settings come from --config "
            "(TOML, same names with underscores), overridden by flags.", 78),
        epilog=OUTPUTS + "\n\n" + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML config file (lungseg-edge config --sample prints one with every setting)")
    add_run_arguments(p)  # one flag per setting, help from its declaration; unset flags leave the file's value


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the sample config file (every setting, explained, with its default)",
                       description="Print the sample TOML config file, generated from the settings' declaration "
                       "(the packaged packaging/lungseg-edge.toml is this output).", epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", action="store_true", required=True, help="print the sample config file")


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
    p.add_argument("--backend", choices=BACKENDS, default="auto")
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
    _add_config(sub)
    _add_render(sub)
    _add_status(sub)
    _add_demo(sub)
    _add_build_engine(sub)
    _add_reprocess(sub)
    _add_audit(sub)
    _add_forward(sub)
    drift_report.add_parser(sub)  # issue 23
    return parser


def _add_forward(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forward", help="list or retry dead-lettered outputs (not delivered to the PACS)",
                       description="An output the forwarder gave up on (forward_max_attempts failures, or missing "
                       "from disk) is dead-lettered: `list` shows them, `retry` queues them again with a fresh "
                       "attempt count (the running service picks them up within a second).",
                       epilog="exit codes: 0 done (list: none dead-lettered); 1 list: some are dead-lettered; "
                       "2 usage error; 5 no ledger in the state folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="forward_command", required=True, metavar="ACTION")
    for q in (actions.add_parser("list", help="the dead letters"),
              actions.add_parser("retry", help="queue dead letters again")):
        q.add_argument("--state", type=Path, required=True, help="the --state folder (or <out>/.lungseg-state)")
        q.add_argument("--json", action="store_true", help="print JSON")
    actions.choices["retry"].add_argument("paths", nargs="*", metavar="OUTPUT",
                                          help="output paths as listed (default: all)")


def cmd_forward(args: argparse.Namespace) -> int:
    if not (args.state / LEDGER_NAME).is_file():
        print(f"lungseg-edge forward: no ledger in {args.state}", file=sys.stderr)
        return 5
    from lungseg.edge_runtime.logs import uid_ref

    try:
        ledger = Ledger(args.state, readonly=args.forward_command == "list")
        try:
            if args.forward_command == "retry":
                queued = ledger.forward_retry(args.paths or None)
            else:
                dead = ledger.forward_dead()
        finally:
            ledger.close()
    except sqlite3.Error as exc:
        print(f"lungseg-edge forward: cannot use the ledger in {args.state}: {exc}", file=sys.stderr)
        return 5
    if args.forward_command == "retry":
        print(json.dumps({"queued": queued}) if args.json else f"{queued} dead letter(s) queued again")
        return 0
    for row in dead:
        row["sop_uid"] = uid_ref(row["sop_uid"])  # the paths are named by UID already; the UID itself is hashed
    if args.json:
        print(json.dumps({"dead_letters": dead}, indent=2))
    else:
        for row in dead:
            print(f"{row['path']}  attempts {row['attempts']}  {row['last_error']}")
        print(f"{len(dead)} dead letter(s)")
    return 1 if dead else 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="check the audit trail, or show what happened to one file or instance",
                       description="The audit trail (<state>/audit/*.jsonl) is hash-chained: `verify` checks every "
                       "line of every file in order; `show` lists the events about one file (by its path: its "
                       "reference and content hash are computed as the service does) or one SOP Instance UID.",
                       epilog="exit codes: 0 chain intact / events found; 1 chain broken (the first bad file:line "
                       "is named) / no event found; 2 usage error; 5 no audit trail in the state folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = actions.add_parser("verify", help="check the hash chain of every audit file")
    show = actions.add_parser("show", help="the events about one file or SOP instance")
    for q in (verify, show):
        q.add_argument("--state", type=Path, required=True, help="the --state folder (or <out>/.lungseg-state)")
        q.add_argument("--json", action="store_true", help="print JSON")
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("--file", type=Path, metavar="PATH", help="a file as it lies (or lay) in the watch folder")
    which.add_argument("--sop", metavar="UID", help="a SOPInstanceUID")


def cmd_audit(args: argparse.Namespace) -> int:
    folder = args.state / audit.FOLDER
    if not audit.trail_files(folder):
        print(f"lungseg-edge audit: no audit trail in {folder}", file=sys.stderr)
        return 5
    if args.audit_command == "verify":
        checked, problem = audit.verify(folder)
        if args.json:
            print(json.dumps({"ok": problem is None, "lines": checked, "files": len(audit.trail_files(folder)),
                              "problem": None if problem is None else {"file": str(problem.path),
                                                                       "line": problem.line,
                                                                       "reason": problem.reason}}))
        elif problem is None:
            print(f"audit trail intact: {checked} line(s) in {len(audit.trail_files(folder))} file(s)")
        else:
            print(f"audit trail broken at {problem} ({checked} line(s) before it are intact)", file=sys.stderr)
        return 0 if problem is None else 1
    hasher = audit.Hasher(args.state)
    files: set[str] = set()
    shas: set[str] = set()
    sops: set[str] = set()
    if args.file is not None:
        path = Path(args.file).absolute()
        with contextlib.suppress(OSError):
            path = path.resolve()
        files.add(hasher.file_ref(path))
        if path.is_file():
            shas.add(sha256_of(path))
    else:
        sops = hasher.uid_forms(args.sop)
    events = audit.find(folder, files, shas, sops)
    if args.json:
        print(json.dumps({"query": {"file_ref": sorted(files), "sha256": sorted(shas), "sop": sorted(sops)},
                          "events": events}, indent=2))
    elif not events:
        print("no audit event about this file or instance", file=sys.stderr)
    else:
        for event in events:
            print(audit.describe(event))
    return 0 if events else 1


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


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    """The effective :class:`EdgeConfig`: defaults < ``--config`` file < flags."""
    file_settings = load_toml(args.config) if args.config else {}
    return build_config(file_settings, flag_settings(args))


def cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(sample_toml())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        setup_logging(bool(args.log_json), args.verbose or 0)
        logging.getLogger("lungseg.edge").error("configuration: %s", exc)
        return 2
    setup_logging(config.log_json, config.verbose, config.log_uids)
    from lungseg.edge_runtime.daemon import EXIT_INTERNAL, run  # the whole runtime (~0.45 s): not for --help

    try:
        return run(config)
    except Exception:
        logging.getLogger("lungseg.edge").exception("internal error", extra={"event": "crash"})
        return EXIT_INTERNAL


def cmd_render(args: argparse.Namespace) -> int:
    import cv2  # image libraries (~0.3 s with numpy and lungseg.imaging): not for --help
    import numpy as np

    from lungseg.imaging import UnreadableImageError  # imports cv2, numpy, pydicom (~0.3 s): not for --help

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
        from pydicom import dcmread  # ~0.2 s: not for --help

        ds = dcmread(args.input, force=True)
        if int(ds.get("SamplesPerPixel", 1)) == 3:
            rgb = ds.pixel_array
            if ds.get("PhotometricInterpretation", "RGB") != "RGB":
                from pydicom.pixels import convert_color_space  # only for a YBR-coded SC

                rgb = convert_color_space(rgb, ds.PhotometricInterpretation, "RGB")
            image = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR)
        else:
            from lungseg.edge_runtime.overlay import to_gray8  # cv2 drawing code: not for --help
            from lungseg.imaging import read_image  # as above

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
    from lungseg.edge_runtime.backend_status import describe, read_backend_status  # +27 ms (http.server) on --help

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
    from lungseg.predictors import BackendOptions, BackendUnavailableError  # onnxruntime (~0.1 s): not for --help

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        bundle = resolve_bundle(args.model)
    except ModelNotFoundError as exc:
        print(f"lungseg-edge build-engine: {exc}", file=sys.stderr)
        return 3
    from lungseg.tensorrt_runtime import ensure_engine  # TensorRT/CUDA probing (~0.1 s): not for --help

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
    from lungseg.edge_runtime.daemon import run  # the whole runtime (~0.45 s): not for --help

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
    handler = {"run": cmd_run, "config": cmd_config, "render": cmd_render, "status": cmd_status, "demo": cmd_demo,
               "build-engine": cmd_build_engine, "reprocess": cmd_reprocess, "audit": cmd_audit,
               "forward": cmd_forward, "drift": drift_report.cmd_drift}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
