"""Evaluate the drift monitor on the shared data set: quiet on unshifted held-out images, alarms on shifted streams.

``python -m lungseg.benchmarks.drift_eval --data ../shared/data/cxr/manifest.csv [--window 50 100]``

The manifest's patients are split in two halves (:func:`lungseg.data.split_by_patient`, seed 0): the
reference is built from the first (as ``lungseg-export drift-reference`` does from training data), the
streams come from the other, patient-disjoint half. Each stream is shuffled ``--repeats`` times and cut into
consecutive windows of ``--window`` images; a window alarms when the combined score is >= 1
(:mod:`lungseg.drift`). The table gives, per stream and window size, the share of windows that alarmed (the
false alarm rate for ``unshifted``) and the median and largest combined score. The shuffles reuse the same
held-out images, so windows of different shuffles are not independent samples.
Lung fractions come from the ground-truth masks (the model is not run), so the shifts act through the
input descriptors.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from lungseg.data import load_manifest, split_by_patient
from lungseg.drift import Reference, build_reference, compare, record_rows

Transform = Callable[[np.ndarray], np.ndarray]


def _gamma(pixels: np.ndarray) -> np.ndarray:
    """Another processing curve: gamma 0.6 and a raised black level (a different detector preset)."""
    return (0.08 + 0.92 * np.power(np.clip(pixels, 0, 1), 0.6)).astype(np.float32)


def _noise(pixels: np.ndarray) -> np.ndarray:
    """Heavy quantum-like noise: Gaussian, sigma 0.04 of full scale (seeded by the image's size)."""
    rng = np.random.default_rng(pixels.shape[0] * 7919 + pixels.shape[1])
    return np.clip(pixels + rng.normal(0, 0.04, pixels.shape).astype(np.float32), 0, 1)


def _resolution(pixels: np.ndarray) -> np.ndarray:
    """A different detector grid: the image at half its size (coarser spacing)."""
    rows, cols = pixels.shape
    return cv2.resize(pixels, (max(1, cols // 2), max(1, rows // 2)), interpolation=cv2.INTER_AREA)


SHIFTS: dict[str, tuple[str, Transform | None]] = {
    "unshifted": ("all", None),
    "contrast (gamma 0.6 + black level)": ("all", _gamma),
    "noise (sigma 0.04)": ("all", _noise),
    "half resolution": ("all", _resolution),
    "paediatric only": ("paediatric", None),
    "adult only": ("adult", None),
}


def windows(rows: list[dict[str, float]], size: int, repeats: int, seed: int = 0) -> list[list[dict[str, float]]]:
    """``repeats`` shuffles of ``rows``, each cut into consecutive full windows of ``size``."""
    out = []
    for r in range(repeats):
        order = rows[:]
        random.Random(seed + r).shuffle(order)
        out += [order[i:i + size] for i in range(0, len(order) - size + 1, size)]
    return out


def evaluate(reference: Reference, streams: dict[str, list[dict[str, float]]], sizes: list[int],
             repeats: int) -> list[dict[str, object]]:
    table = []
    for name, rows in streams.items():
        for size in sizes:
            cut = windows(rows, size, repeats)
            results = [compare(reference, w) for w in cut]
            scores = [c.score for c in results if c is not None]
            alarms = sum(1 for s in scores if s >= 1.0)
            table.append({"stream": name, "images": len(rows), "window": size, "windows": len(scores),
                          "alarm_rate": round(alarms / len(scores), 4) if scores else None,
                          "median_score": round(statistics.median(scores), 3) if scores else None,
                          "max_score": round(max(scores), 3) if scores else None})
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="manifest.csv of the data set")
    parser.add_argument("--window", type=int, nargs="+", default=[25, 50, 100], help="window sizes")
    parser.add_argument("--repeats", type=int, default=20, help="shuffles of each stream (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args(argv)
    records = load_manifest(args.data)
    ref_part, held = split_by_patient(records, (0.5, 0.5), seed=0)
    reference = build_reference(record_rows(ref_part), f"{args.data.name} half 1 (seed 0)")
    streams = {}
    for name, (subset, transform) in SHIFTS.items():
        chosen = [r for r in held if subset == "all" or (subset == "paediatric") == ("pediatric" in r.view)]
        streams[name] = record_rows(chosen, transform)
    table = evaluate(reference, streams, args.window, args.repeats)
    if args.json:
        print(json.dumps({"reference_images": reference.images, "rows": table}, indent=1))
        return 0
    print(f"reference: {reference.images} images; held-out: {len(held)} images (patient-disjoint)")
    print(f"{'stream':36} {'images':>6} {'window':>6} {'windows':>7} {'alarm rate':>10} {'median score':>12} "
          f"{'max score':>9}")
    for row in table:
        print(f"{row['stream']!s:36} {row['images']:>6} {row['window']:>6} {row['windows']:>7} "
              f"{row['alarm_rate']!s:>10} {row['median_score']!s:>12} {row['max_score']!s:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
