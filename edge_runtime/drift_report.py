"""``lungseg-edge drift``: the drift monitor's report from a state folder (text, ``--json``, ``--png``).

Reads ``<state>/drift/descriptors.jsonl`` (written by the service) and the bundle's ``drift_reference.json``;
the PNG shows, per descriptor, the reference's bin proportions beside the count window's (OpenCV only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lungseg.bundle import ModelNotFoundError, resolve_bundle

if TYPE_CHECKING:
    from lungseg import drift

EXIT_NO_DATA = 5


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("drift", help="has the input changed? recent images vs the bundle's drift reference",
                       description="Compares the service's recent images (<state>/drift/descriptors.jsonl) with the "
                       "bundle's drift_reference.json and the site baseline: PSI per descriptor against its "
                       "threshold, and the combined score (alarm at >= 1), for the count and the 24-hour window.",
                       epilog="exit codes: 0 no alarm; 1 alarm; 2 usage error; 3 model not found; 5 no reference "
                       "in the bundle, or no drift data in the state folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", type=Path, required=True, help="the --state folder (or <out>/.lungseg-state)")
    p.add_argument("--model", default=None, metavar="BUNDLE", help="model bundle (default: the shipped one)")
    p.add_argument("--window", type=int, default=100, metavar="N", help="count window (default: %(default)s)")
    p.add_argument("--site-after", type=int, default=500, metavar="N",
                   help="site baseline after N images, as the service's drift_site_after (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--png", type=Path, default=None, metavar="PATH",
                   help="also write a PNG of the histograms, reference vs the count window")


def histogram_png(reference: drift.Reference, rows: list[dict[str, float]], path: Path) -> None:
    """One panel per descriptor: reference bin proportions (grey) and recent (orange), PSI in the title."""
    import cv2  # OpenCV, numpy (~0.2 s): not for the CLI's --help
    import numpy as np
    names = sorted(reference.descriptors)
    cols, panel_w, panel_h = 3, 320, 200
    body = panel_h * ((len(names) + cols - 1) // cols)
    grid = np.full((body + 24, panel_w * cols, 3), 255, np.uint8)
    cv2.putText(grid, f"grey: reference ({reference.images} images), orange: recent ({len(rows)} images); "
                "bins: the reference's deciles", (8, body + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    for i, name in enumerate(names):
        binned = reference.descriptors[name]
        ref = np.asarray(binned.counts, float) / max(binned.total, 1)
        values = [r[name] for r in rows if name in r]
        recent = binned.histogram(values) / max(len(values), 1) if values else np.zeros_like(ref)
        x0, y0 = (i % cols) * panel_w, (i // cols) * panel_h
        top, bottom, left = y0 + 30, y0 + panel_h - 12, x0 + 10
        peak = max(float(ref.max()), float(recent.max()), 1e-9)
        bar = (panel_w - 20) / len(ref)
        for b, (q, p) in enumerate(zip(ref, recent, strict=True)):
            bx = int(left + b * bar)
            for frac, colour, offset in ((q, (160, 160, 160), 0), (p, (0, 140, 255), int(bar / 2))):
                height = int((bottom - top) * frac / peak)
                cv2.rectangle(grid, (bx + offset, bottom - height), (bx + offset + max(1, int(bar / 2) - 2), bottom),
                              colour, -1)
        psi = f" PSI {binned.psi(values):.2f}" if values else ""
        cv2.putText(grid, f"{name}{psi}", (x0 + 8, y0 + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
        cv2.line(grid, (left, bottom), (x0 + panel_w - 10, bottom), (0, 0, 0), 1)
    if not cv2.imwrite(str(path), grid):
        raise OSError(f"{path}: could not write the PNG")


def cmd_drift(args: argparse.Namespace) -> int:
    from .drift_monitor import FOLDER, ROWS_FILE, DriftMonitor, reference_of  # numpy, OpenCV: not for --help

    try:
        bundle = resolve_bundle(args.model)
    except ModelNotFoundError as exc:
        print(f"lungseg-edge drift: {exc}", file=sys.stderr)
        return 3
    reference, why = reference_of(bundle.root)
    if reference is None:
        print(f"lungseg-edge drift: monitor off: {why}", file=sys.stderr)
        return EXIT_NO_DATA
    folder = args.state / FOLDER
    if not (folder / ROWS_FILE).is_file():
        print(f"lungseg-edge drift: no drift data in {folder} (has the service processed images?)", file=sys.stderr)
        return EXIT_NO_DATA
    monitor = DriftMonitor(reference, folder, args.window, args.site_after)
    report = monitor.report()
    alarm = any(c and c["alarm"] for c in report["comparisons"].values())
    if args.png is not None:
        histogram_png(reference, monitor.windows()["count"], args.png)
    if args.json:
        print(json.dumps(report, indent=2))
        return 1 if alarm else 0
    print(f"images seen: {report['images_seen']}; reference: {reference.images} images ({reference.source}); "
          f"site baseline: {f'after {args.site_after} images' if monitor.site is None else 'frozen'}")
    for key, comparison in report["comparisons"].items():
        if comparison is None:
            print(f"{key:12} not enough images (or no site baseline yet)")
            continue
        worst = sorted(comparison["descriptors"].items(), key=lambda kv: -kv[1]["psi"] / kv[1]["threshold"])[:3]
        words = ", ".join(f"{k} PSI {v['psi']:.3f} (threshold {v['threshold']:.3f})" for k, v in worst)
        print(f"{key:12} {comparison['images']:5d} images  score {comparison['score']:.2f}"
              f"{'  ALARM' if comparison['alarm'] else ''}  top: {words}")
    if args.png is not None:
        print(f"histograms: {args.png}")
    return 1 if alarm else 0
