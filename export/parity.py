"""Parity between two sets of probability maps: the one place export and bench compute it.

Numpy only (no torch, no onnx), so ``lungseg-bench`` can use it on a runtime-only
install. A comparison thresholds both maps at ``threshold`` (the model's 0.5) and
reports the mask Dice per image (mean and worst), the fraction of pixels whose
label flips, and |Δprobability| over all pixels (max, median, p99). The gate is
the **mean** mask Dice against a precision-dependent minimum; the worst image is
reported beside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.atomic import atomic_write
from lungseg.metrics import dice

DEFAULT_THRESHOLD = 0.5
DEFAULT_MIN_DICE_FP32 = 0.999
DEFAULT_MIN_DICE_REDUCED = 0.99
GATE_STATISTIC = "dice_mean"
MIN_PARITY_IMAGES = 16


@dataclass(frozen=True)
class ParityResult:
    """How closely ``candidate`` reproduces ``reference`` on the same images."""

    candidate: str
    reference: str
    precision: str
    n_images: int
    dice_mean: float
    dice_min: float
    flip_fraction: float
    abs_diff_max: float
    abs_diff_median: float
    abs_diff_p99: float
    required_dice: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def required_dice(precision: str, min_dice_fp32: float = DEFAULT_MIN_DICE_FP32,
                  min_dice_reduced: float = DEFAULT_MIN_DICE_REDUCED) -> float:
    """The gate for a precision: fp32 must match almost exactly, fp16/int8 a little less."""
    return min_dice_fp32 if precision == "fp32" else min_dice_reduced


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    candidate_name: str,
    reference_name: str,
    precision: str,
    min_dice: float,
    threshold: float = DEFAULT_THRESHOLD,
) -> ParityResult:
    """Compare ``(N, H, W)`` probability maps; ``passed`` means mean Dice >= ``min_dice``."""
    if reference.shape != candidate.shape:
        raise ValueError(f"{candidate_name}: output shape {candidate.shape} != reference {reference.shape}")
    ref_masks = reference >= threshold
    cand_masks = candidate >= threshold
    dices = np.array([dice(r, c) for r, c in zip(ref_masks, cand_masks, strict=True)], dtype=np.float64)
    delta = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    p50, p99 = np.percentile(delta, (50, 99))
    dice_mean = float(dices.mean())
    return ParityResult(
        candidate=candidate_name,
        reference=reference_name,
        precision=precision,
        n_images=int(reference.shape[0]),
        dice_mean=dice_mean,
        dice_min=float(dices.min()),
        flip_fraction=float(np.count_nonzero(ref_masks != cand_masks) / ref_masks.size),
        abs_diff_max=float(delta.max()),
        abs_diff_median=float(p50),
        abs_diff_p99=float(p99),
        required_dice=min_dice,
        passed=bool(dice_mean >= min_dice),
    )


def predict_in_chunks(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray,
                      chunk: int = 4) -> np.ndarray:
    """Run ``predict`` over ``(N, 3, S, S)`` in chunks; returns ``(N, S, S)`` float32."""
    parts = [predict(batch[i:i + chunk]) for i in range(0, len(batch), chunk)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def format_table(results: Mapping[str, ParityResult]) -> str:
    """A fixed-width text table of parity results, one row per candidate."""
    header = (f"{'model':<26} {'prec':<5} {'n':>3} {'dice mean':>10} {'dice min':>9} {'flip %':>8} "
              f"{'|d| max':>9} {'|d| p50':>9} {'|d| p99':>9} {'need':>6}  result")
    rows = [header, "-" * len(header)]
    for name, r in results.items():
        rows.append(
            f"{name:<26} {r.precision:<5} {r.n_images:>3} {r.dice_mean:>10.5f} {r.dice_min:>9.5f} "
            f"{100 * r.flip_fraction:>8.4f} {r.abs_diff_max:>9.2e} {r.abs_diff_median:>9.2e} "
            f"{r.abs_diff_p99:>9.2e} {r.required_dice:>6.3f}  {'pass' if r.passed else 'FAIL'}"
        )
    return "\n".join(rows)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, replacing ``path`` atomically."""
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
