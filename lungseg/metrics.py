"""The paper's nine per-image segmentation metrics, with "ignore" pixels left out."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

METRIC_NAMES = ("ACC", "AUC", "DICE", "JACC", "PREC", "RECA", "F1", "SENS", "SPEC")


def _safe(num: float, den: float, empty: float = 1.0) -> float:
    return num / den if den else empty


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if one class."""
    labels = labels.astype(bool).ravel()
    scores = scores.astype(np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def image_metrics(
    probabilities: np.ndarray,
    truth: np.ndarray,
    valid: np.ndarray | None = None,
    threshold: float = 0.5,
    prediction: np.ndarray | None = None,
) -> dict[str, float]:
    """Nine metrics for one image.

    ``truth`` is a boolean lung mask, ``valid`` marks the pixels that count
    (``False`` for the dataset's "ignore" label). ``prediction`` defaults to
    ``probabilities >= threshold``; AUC always uses the probabilities.
    """
    if valid is None:
        valid = np.ones(truth.shape, dtype=bool)
    t = truth.astype(bool)[valid]
    p = (probabilities >= threshold if prediction is None else prediction).astype(bool)[valid]
    tp = float(np.count_nonzero(t & p))
    tn = float(np.count_nonzero(~t & ~p))
    fp = float(np.count_nonzero(~t & p))
    fn = float(np.count_nonzero(t & ~p))
    prec_lung, prec_bg = _safe(tp, tp + fp), _safe(tn, tn + fn)
    sens, spec = _safe(tp, tp + fn), _safe(tn, tn + fp)
    f1_lung = _safe(2 * prec_lung * sens, prec_lung + sens, 0.0)
    f1_bg = _safe(2 * prec_bg * spec, prec_bg + spec, 0.0)
    return {
        "ACC": _safe(tp + tn, tp + tn + fp + fn),
        "AUC": roc_auc(probabilities[valid], t),
        "DICE": _safe(2 * tp, 2 * tp + fp + fn),
        "JACC": _safe(tp, tp + fp + fn),
        "PREC": (prec_lung + prec_bg) / 2,
        "RECA": (sens + spec) / 2,
        "F1": (f1_lung + f1_bg) / 2,
        "SENS": sens,
        "SPEC": spec,
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient between two binary masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    inter = np.count_nonzero(a & b)
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * inter / total


def summarise(rows: Iterable[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and (population) std of each metric over rows, NaNs ignored."""
    rows = list(rows)
    out: dict[str, dict[str, float]] = {}
    for name in METRIC_NAMES:
        values = np.array([r[name] for r in rows if name in r], dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size:
            out[name] = {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}
    return out


def summarise_by(rows: Iterable[Mapping[str, object]], key: str) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`summarise` per value of ``key`` (e.g. the image class)."""
    groups: dict[str, list[Mapping[str, float]]] = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(row)  # type: ignore[arg-type]
    return {name: summarise(group) for name, group in sorted(groups.items())}
