"""Stress classes for the gate's false alarms, built from the gate's *training* patients only.

The QA set's false alarms were a white-out ICU film called not-a-chest, an AP film with an implausible shape and a
young child's AP film called not-a-chest. None of these happens on this project's held-out radiographs
(``lungseg.train.gate_eval``: no good image refused), so this script makes the hard cases from training images, with
their true lung masks, to see how the gate + policy + shape check treat them:

``white_out``   the lungs opacified towards the brightness of the mediastinum (severity 0.6 and 0.85 of the way),
                edges softened, as in severe ARDS / pulmonary oedema on a supine ICU film;
``small_child`` the whole film shrunk to 55-70 % inside a dark border of random width (a small patient on a large
                cassette, with collimation), as on a young child's AP film;
``low_contrast`` the window squeezed to 35 % of the range around a raised mean (an under-penetrated portable film);
``as_stored``   the same images unaltered (the baseline).

A stressed good image counts as a false alarm when refused or flagged (like ``gate_eval``). Nothing here is scored
on held-out patients; it is for understanding and for choosing a policy on training data only.
``python -m lungseg.train.gate_stress --model BUNDLE --data MANIFEST --out stress.json [--n 120]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.data import read_label_mask
from lungseg.gate import GatePolicy
from lungseg.imaging import read_image
from lungseg.train.gate_data import gate_split, small_patient, white_out
from lungseg.train.gate_eval import GateChecker, add_bundle_arguments

log = logging.getLogger("lungseg.train.gate_stress")
CLASSES = ("as_stored", "white_out_0.6", "white_out_0.85", "small_child", "low_contrast")


def low_contrast(pixels: np.ndarray) -> np.ndarray:
    return np.clip(0.45 + 0.35 * (pixels - 0.5), 0.0, 1.0).astype(np.float32)


def stressed(pixels: np.ndarray, lung: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "as_stored":
        return pixels
    if kind.startswith("white_out_"):
        return white_out(pixels, lung, float(kind.rsplit("_", 1)[1]))
    if kind == "small_child":
        return small_patient(pixels, rng)
    return low_contrast(pixels)


def run(bundle: Path, manifest: Path, n: int, seed: int = 0, threads: int = 2,
        policy: GatePolicy | None = None) -> dict[str, Any]:
    checker = GateChecker.load(bundle, threads, policy)
    rng = np.random.default_rng(seed)
    train = gate_split(manifest).train
    chosen = [train[int(i)] for i in rng.choice(len(train), size=min(n, len(train)), replace=False)]
    rows: list[dict[str, Any]] = []
    for count, record in enumerate(chosen, 1):
        pixels = read_image(record.image).pixels
        lung, _ = read_label_mask(record.mask)
        for kind in CLASSES:
            row, _ = checker.check(kind, record.id, stressed(pixels, lung, kind, rng))
            rows.append({**row, "view": record.view})
        if count % 20 == 0:
            log.info("%d / %d training images stressed", count, len(chosen))
    return {"policy": checker.policy.__dict__, "n_images": len(chosen), "classes": summarise(rows), "rows": rows}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in CLASSES:
        sub = [r for r in rows if r["class"] == kind]
        if not sub:
            continue
        reasons: dict[str, int] = {}
        for r in sub:
            for reason in r["flags"] + ([r["refused"]] if r["refused"] else []):
                reasons[reason] = reasons.get(reason, 0) + 1
        chest = [r["gate"]["chest"] for r in sub if "gate" in r]
        out[kind] = {"n": len(sub), "flagged": round(float(np.mean([r["caught"] for r in sub])), 4),
                     "refused": round(float(np.mean([bool(r["refused"]) for r in sub])), 4), "reasons": reasons,
                     "chest_score_min": round(min(chest), 4) if chest else None}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lungseg.train.gate_stress",
                                     description="Gate false alarms on stressed training images (see the docstring).")
    add_bundle_arguments(parser)
    parser.add_argument("--n", type=int, default=120, help="training images to stress (default 120)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(args.model, args.data, args.n, threads=args.threads)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["classes"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
