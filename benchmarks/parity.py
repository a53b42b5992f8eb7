"""Parity of every available backend against the reference, and ground-truth metrics.

The comparison itself is :func:`lungseg.export.parity.compare`, the one export
uses. The reference is PyTorch when present, else onnxruntime CPU fp32. Where
the images have label masks, the nine metrics of :mod:`lungseg.metrics` are
computed per backend at native resolution (probability mapped back with the
image's :class:`~lungseg.preprocess.Geometry`, thresholded, no postprocessing)
with their difference from the reference backend's.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lungseg.export.parity import DEFAULT_THRESHOLD, compare, predict_in_chunks, required_dice
from lungseg.export.samples import Sample
from lungseg.metrics import METRIC_NAMES, image_metrics, summarise
from lungseg.preprocess import Geometry

from .backends import CPU_FP32, REFERENCE, Backend

log = logging.getLogger(__name__)


def truth_metrics(probabilities: np.ndarray, geometries: list[Geometry], samples: list[Sample]) -> dict[str, float]:
    """Mean of each of the nine metrics over the samples that have a label mask."""
    rows = [
        image_metrics(geometry.to_native(probability), sample.truth, sample.valid, threshold=DEFAULT_THRESHOLD)
        for probability, geometry, sample in zip(probabilities, geometries, samples, strict=True)
        if sample.truth is not None
    ]
    return {name: stats["mean"] for name, stats in summarise(rows).items()}


def run_parity(backends: list[Backend], batch: np.ndarray, geometries: list[Geometry], samples: list[Sample],
               *, min_dice_fp32: float, min_dice_reduced: float, progress: bool = True) -> dict[str, Any]:
    """Predict with every available backend and compare each with the reference."""
    from tqdm import tqdm

    available = [b for b in backends if b.available]
    names = [b.name for b in available]
    reference = REFERENCE if REFERENCE in names else CPU_FP32
    outputs: dict[str, np.ndarray] = {}
    for backend in tqdm(available, desc="parity", unit="backend", disable=not progress):
        outputs[backend.name] = predict_in_chunks(backend.predictor.predict, batch)  # type: ignore[union-attr]
    has_truth = any(s.truth is not None for s in samples)
    metrics = {name: truth_metrics(out, geometries, samples) for name, out in outputs.items()} if has_truth else {}
    results: dict[str, Any] = {reference: {"candidate": reference, "reference": reference, "is_reference": True}}
    for backend in available:
        if backend.name == reference:
            continue
        precision = backend.predictor.precision  # type: ignore[union-attr]
        entry = compare(
            outputs[reference], outputs[backend.name], candidate_name=backend.name, reference_name=reference,
            precision=precision, min_dice=required_dice(precision, min_dice_fp32, min_dice_reduced),
        ).to_dict()
        results[backend.name] = entry
    for name, values in metrics.items():
        results[name]["metrics"] = values
        results[name]["metrics_delta_vs_reference"] = {
            k: values[k] - metrics[reference][k] for k in METRIC_NAMES if k in values and k in metrics[reference]
        }
    return {
        "reference": reference,
        "threshold": DEFAULT_THRESHOLD,
        "n_images": len(batch),
        "with_truth": has_truth,
        "results": results,
        "passed": all(entry.get("passed", True) for entry in results.values()),
    }
