"""Score the gate + policy + shape check on a fault set built from held-out patients only.

Classes (each from the held-out radiographs of :func:`lungseg.train.gate_data.gate_split`):
``good`` (as stored), ``rot90`` / ``rot180`` / ``rot270`` (quarter turns), ``negative``,
``mirrored``, ``not_chest`` (held-out real non-chest DICOM images from pydicom's test data, in
several turns and crops, plus small crops of held-out radiographs), and two hard but good classes,
``hard:white_out`` and ``hard:small_patient`` (:func:`lungseg.train.gate_data.white_out` /
``small_patient``), reported apart (``hard_good``: refused, called not-a-chest, flagged at all). A wrong image counts as
caught when it is refused or carries any flag (a correction is a flag: it is reported);
a good image counts as a false alarm when it carries any flag or is refused.

Also: Dice of upside-down images after auto-correction vs their upright originals (against
the ground truth), and the gate's CPU time vs the segmenter's per file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.bundle import resolve_bundle
from lungseg.data import read_label_mask
from lungseg.gate import GatePolicy, Refused, gate_input_from_pixels, gated_segment, load_gate
from lungseg.imaging import Radiograph, read_image
from lungseg.inference import segment_batch
from lungseg.metrics import dice
from lungseg.plausibility import load_shape_model
from lungseg.predictors import OnnxRuntimePredictor
from lungseg.train.gate_data import (
    NONCHEST_HELDOUT,
    find_nonchest,
    gate_split,
    read_any_dicom,
    small_patient,
    white_out,
)

log = logging.getLogger("lungseg.train.gate_eval")


WHITE_OUT_QUANTILE = 0.9  # "white-out": lungs brighter than 90 % of the training images' lungs (training only)


def lung_brightness(pixels: np.ndarray, lung: np.ndarray, valid: np.ndarray) -> float:
    """Mean [0, 1] intensity inside the reference lung mask: high for opacified ("white-out") lungs."""
    inside = lung.astype(bool) & valid.astype(bool)
    return float(pixels[inside].mean()) if inside.any() else float("nan")


def white_out_threshold(records: list[Any]) -> float:
    """The :data:`WHITE_OUT_QUANTILE` of lung brightness over ``records`` (the gate's training patients)."""
    values = []
    for record in records:
        lung, valid = read_label_mask(record.mask)
        values.append(lung_brightness(read_image(record.image).pixels, lung, valid))
    return float(np.nanquantile(values, WHITE_OUT_QUANTILE))


def groups_of(record: Any, brightness: float, white_out: float) -> list[str]:
    """The subgroups a good image's false alarm is counted in (view, class, portable, white-out)."""
    groups = [f"view:{record.view or 'unknown'}", f"class:{record.image_class}",
              "portable" if record.portable else "not_portable"]
    if brightness >= white_out:
        groups.append("white_out")
    return groups


def _fault_images(heldout: list[Any], per_class: int, seed: int) -> list[tuple[str, str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    chosen = [heldout[int(i)] for i in rng.choice(len(heldout), size=min(per_class, len(heldout)), replace=False)]
    items: list[tuple[str, str, np.ndarray]] = []
    for record in chosen:
        pixels = read_image(record.image).pixels
        items += [("rot90", record.id, np.rot90(pixels, 1)), ("rot180", record.id, np.rot90(pixels, 2)),
                  ("rot270", record.id, np.rot90(pixels, 3)), ("negative", record.id, 1.0 - pixels),
                  ("mirrored", record.id, pixels[:, ::-1])]
        lung, _ = read_label_mask(record.mask)  # hard but good: must not be refused or called not-a-chest
        items += [("hard:white_out", record.id, white_out(pixels, lung, 0.85)),
                  ("hard:small_patient", record.id, small_patient(pixels, rng))]
    for record in chosen[: per_class // 2]:
        pixels = read_image(record.image).pixels
        rows, cols = pixels.shape
        h, w = int(rows * rng.uniform(0.2, 0.35)), int(cols * rng.uniform(0.2, 0.35))
        top, left = int(rng.integers(0, rows - h)), int(rng.integers(0, cols - w))
        items.append(("not_chest", f"crop:{record.id}", pixels[top:top + h, left:left + w]))
    for path in find_nonchest(NONCHEST_HELDOUT):
        try:
            pixels = read_any_dicom(path)
        except Exception as exc:
            log.warning("%s left out: %s", path.name, exc)
            continue
        for k in range(4):
            items.append(("not_chest", f"{path.name}:rot{k * 90}", np.rot90(pixels, k)))
            items.append(("not_chest", f"{path.name}:negative:rot{k * 90}", 1.0 - np.rot90(pixels, k)))
    return [(c, i, np.ascontiguousarray(p, dtype=np.float32)) for c, i, p in items]


@dataclass
class GateChecker:
    """A bundle's segmenter, gate, shape model and gate policy, run on one image as the product runs them."""

    predictor: Any
    gate: Any
    shape_model: Any
    policy: GatePolicy

    @classmethod
    def load(cls, bundle: Path, threads: int = 2, policy: GatePolicy | None = None) -> GateChecker:
        """``policy``'s mirror threshold defaults to the one calibrated for the bundle's gate."""
        resolved = resolve_bundle(bundle)
        predictor = OnnxRuntimePredictor(str(resolved.onnx), threads=threads)
        gate, shape_model = load_gate(resolved.root), load_shape_model(resolved.root)
        if gate is None or shape_model is None:
            raise SystemExit(f"{bundle}: the bundle has no gate.onnx / shape_model.npz")
        return cls(predictor, gate, shape_model, gate.policy(policy or GatePolicy()))

    def check(self, kind: str, ident: str, pixels: np.ndarray) -> tuple[dict[str, Any], Any]:
        """``(row, result)``: the image refused, or segmented with its flags (``caught``: refused or flagged)."""
        result = gated_segment(self.predictor, self.gate, [Radiograph(pixels=pixels, source=ident)], None,
                               self.policy, self.shape_model)[0]
        if isinstance(result, Refused):
            return {"class": kind, "id": ident, "refused": result.code, "flags": [], "caught": True}, result
        flags = result.qa["flags"]
        return {"class": kind, "id": ident, "refused": None, "flags": flags, "caught": bool(flags),
                "review": result.qa["review"], "gate": result.qa["gate"]["scores"]}, result


def evaluate(bundle: Path, manifest: Path, per_class: int = 60, seed: int = 0, threads: int = 2,
             policy: GatePolicy | None = None) -> dict[str, Any]:
    checker = GateChecker.load(bundle, threads, policy)
    split = gate_split(manifest)
    white_out_level = white_out_threshold(split.train)
    rows: list[dict[str, Any]] = []

    def run(kind: str, ident: str, pixels: np.ndarray) -> Any:
        row, result = checker.check(kind, ident, pixels)
        rows.append(row)
        if len(rows) % 50 == 0:
            log.info("fault set: %d images scored", len(rows))
        return result

    dice_upright, dice_corrected = [], []
    good_dice_by_id: dict[str, float] = {}  # the upright originals of the rot180 class are among these
    for record in split.heldout:  # every held-out image as stored: the false-alarm rate and Dice
        pixels = read_image(record.image).pixels
        lung, valid = read_label_mask(record.mask)
        result = run("good", record.id, pixels)
        rows[-1]["groups"] = groups_of(record, lung_brightness(pixels, lung, valid), white_out_level)
        if not isinstance(result, Refused):
            good_dice_by_id[record.id] = dice(result.mask[valid], lung[valid])
    by_id = {r.id: r for r in split.heldout}
    for kind, ident, pixels in _fault_images(split.heldout, per_class, seed):
        result = run(kind, ident, pixels)
        if kind == "rot180" and not isinstance(result, Refused):
            corrected = "orientation_corrected:180" in result.qa["flags"]
            if corrected and ident in good_dice_by_id:
                lung, valid = read_label_mask(by_id[ident].mask)
                back = np.rot90(result.mask, 2)  # the stored (upside-down) grid -> upright, to compare
                dice_corrected.append(dice(back[valid], lung[valid]))
                dice_upright.append(good_dice_by_id[ident])
    timing = cpu_timing(checker.predictor, checker.gate, split.heldout[:30])
    report = summarise(rows, list(good_dice_by_id.values()), dice_upright, dice_corrected, timing, checker.policy)
    report["white_out_threshold"] = round(white_out_level, 4)
    return report


def cpu_timing(predictor: Any, gate: Any, records: list[Any]) -> dict[str, Any]:
    """Process CPU time per file: the gate (its input + ONNX) vs the segmenter (preprocess, infer, postprocess)."""
    gate_s, seg_s = [], []
    for record in records:
        radiograph = read_image(record.image)
        t0 = time.process_time()
        gate.scores(gate_input_from_pixels(radiograph.pixels)[None])
        t1 = time.process_time()
        _ = segment_batch(predictor, [radiograph])[0].mask
        t2 = time.process_time()
        gate_s.append(t1 - t0)
        seg_s.append(t2 - t1)
    gate_ms, seg_ms = 1000 * float(np.median(gate_s)), 1000 * float(np.median(seg_s))
    return {"n": len(records), "gate_cpu_ms_median": round(gate_ms, 2), "segmenter_cpu_ms_median": round(seg_ms, 2),
            "gate_over_segmenter": round(gate_ms / seg_ms, 4)}


def summarise(rows: list[dict[str, Any]], good_dice: list[float], dice_upright: list[float],
              dice_corrected: list[float], timing: dict[str, Any], policy: GatePolicy) -> dict[str, Any]:
    classes: dict[str, dict[str, Any]] = {}
    for kind in sorted({r["class"] for r in rows}):
        sub = [r for r in rows if r["class"] == kind]
        expected = {"rot90": "orientation_corrected:270", "rot180": "orientation_corrected:180",
                    "rot270": "orientation_corrected:90", "negative": "negative_corrected"}.get(kind)
        classes[kind] = {
            "n": len(sub),
            "caught": round(float(np.mean([r["caught"] for r in sub])), 4),
            "refused": round(float(np.mean([bool(r["refused"]) for r in sub])), 4),
            "needs_review": round(float(np.mean([bool(r.get("review")) for r in sub])), 4),
            **({"correctly_corrected": round(float(np.mean([expected in r["flags"] for r in sub])), 4)}
               if expected else {}),
        }
    wrong = [r for r in rows if r["class"] != "good" and not r["class"].startswith("hard:")]
    hard: dict[str, dict[str, Any]] = {}
    for kind in sorted({r["class"] for r in rows if r["class"].startswith("hard:")}):
        sub = [r for r in rows if r["class"] == kind]
        hard[kind] = {"n": len(sub), "refused": round(float(np.mean([bool(r["refused"]) for r in sub])), 4),
                      "called_not_chest": round(float(np.mean([r["refused"] == "not_chest" or "not_chest" in r["flags"]
                                                               for r in sub])), 4),
                      "flagged": round(float(np.mean([r["caught"] for r in sub])), 4)}
    good = [r for r in rows if r["class"] == "good"]
    flag_counts: dict[str, int] = {}
    for r in good:
        for f in r["flags"] + ([r["refused"]] if r["refused"] else []):
            flag_counts[f] = flag_counts.get(f, 0) + 1
    by_group: dict[str, dict[str, Any]] = {}
    for group in sorted({g for r in good for g in r.get("groups", [])}):
        members = [r for r in good if group in r.get("groups", [])]
        flagged = [r for r in members if r["caught"]]
        by_group[group] = {"n": len(members), "flagged": len(flagged),
                           "rate": round(len(flagged) / len(members), 4),
                           "reasons": sorted({f for r in flagged for f in r["flags"] + [r["refused"] or ""] if f})}
    return {
        "policy": policy.__dict__,
        "good_flagged_by_group": by_group,
        "hard_good": hard,
        "wrong_caught": round(float(np.mean([r["caught"] for r in wrong])), 4),
        "n_wrong": len(wrong),
        "good_flagged": round(float(np.mean([r["caught"] for r in good])), 4),
        "n_good": len(good),
        "good_flags": flag_counts,
        "mirrored_flagged": classes.get("mirrored", {}).get("caught"),
        "classes": classes,
        "dice_good_mean": round(float(np.mean(good_dice)), 4) if good_dice else None,
        "upside_down": {"n_corrected": len(dice_corrected),
                        "dice_upright_mean": round(float(np.mean(dice_upright)), 4) if dice_upright else None,
                        "dice_corrected_mean": round(float(np.mean(dice_corrected)), 4) if dice_corrected else None,
                        "max_abs_pair_diff": round(float(np.max(np.abs(np.subtract(dice_upright, dice_corrected)))),
                                                   4) if dice_corrected else None},
        "cpu_time": timing,
        "rows": rows,
    }


def add_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--data``, ``--out`` and ``--threads``: the options every gate evaluation tool takes."""
    parser.add_argument("--model", type=Path, required=True, help="bundle with model.onnx, gate.onnx, shape_model.npz")
    parser.add_argument("--data", type=Path, required=True, help="manifest CSV")
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    parser.add_argument("--threads", type=int, default=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lungseg.train.gate_eval",
                                     description="Fault-set evaluation of the image gate on held-out patients.")
    add_bundle_arguments(parser)
    parser.add_argument("--per-class", type=int, default=60, help="held-out radiographs per fault class")
    parser.add_argument("--mirror-threshold", type=float, default=None,
                        help="policy mirror threshold (default: the one calibrated for the bundle's gate)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    policy = GatePolicy() if args.mirror_threshold is None else GatePolicy(mirrored_threshold=args.mirror_threshold)
    report = evaluate(args.model, args.data, args.per_class, threads=args.threads, policy=policy)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
