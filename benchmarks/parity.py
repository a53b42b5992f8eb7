"""Parity of every available backend against the reference and the bundle's golden set, and ground-truth metrics.

The comparison itself is :func:`lungseg.export.parity.compare`, the one export
uses. On the benchmark images the reference is PyTorch when present (the
``[train]`` extra and a checkpoint), else onnxruntime CPU fp32 (the fp32 ONNX).
Every backend is also run on the bundle's golden set (``golden.npz``: inputs and
the fp32 PyTorch probabilities recorded by ``lungseg-export``), so a runtime-only
install still checks each backend, the fp32 ONNX included, against PyTorch's
numbers. Where the images have label masks, the nine metrics of
:mod:`lungseg.metrics` are computed per backend at native resolution (probability
mapped back with the image's :class:`~lungseg.preprocess.Geometry`, thresholded,
no postprocessing) with their difference from the reference backend's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.bundle import GOLDEN
from lungseg.export.parity import DEFAULT_THRESHOLD, compare, predict_in_chunks, required_dice
from lungseg.export.samples import Sample
from lungseg.metrics import METRIC_NAMES, image_metrics, summarise
from lungseg.preprocess import Geometry
from lungseg.selftest import GoldenSetError, load_golden

from .backends import CPU_FP32, REFERENCE, Backend
from .progress import track

log = logging.getLogger(__name__)


def truth_metrics(probabilities: np.ndarray, geometries: list[Geometry], samples: list[Sample]) -> dict[str, float]:
    """Mean of each of the nine metrics over the samples that have a label mask."""
    rows = [
        image_metrics(geometry.to_native(probability), sample.truth, sample.valid, threshold=DEFAULT_THRESHOLD)
        for probability, geometry, sample in zip(probabilities, geometries, samples, strict=True)
        if sample.truth is not None
    ]
    return {name: stats["mean"] for name, stats in summarise(rows).items()}


GOLDEN_REFERENCE = "fp32 PyTorch probabilities recorded by lungseg-export"


def reference_description(backends: list[Backend]) -> tuple[str, str]:
    """The reference backend for the benchmark images and, in words, what it is."""
    by_name = {b.name: b for b in backends}
    pytorch = by_name.get(REFERENCE)
    if pytorch is not None and pytorch.available:
        return REFERENCE, f"pytorch: the checkpoint in eager PyTorch, fp32 ({pytorch.describe()['model']})"
    cpu = by_name.get(CPU_FP32)
    why = pytorch.reason if pytorch is not None else "not tried"
    model = cpu.describe().get("model") if cpu is not None and cpu.available else "model.onnx"
    return CPU_FP32, f"onnxruntime-cpu: the fp32 ONNX ({model}) on the CPU; no PyTorch reference ({why})"


def golden_parity(backends: list[Backend], bundle_root: Path, *, min_dice_fp32: float, min_dice_reduced: float,
                  progress: bool = False) -> dict[str, Any]:
    """Every available backend on the bundle's golden set against its recorded PyTorch probabilities.

    A bundle without ``golden.npz`` is skipped (reported); one whose golden set is altered or
    unreadable fails.
    """
    if not (bundle_root / GOLDEN).is_file():
        return {"skipped": f"the bundle has no {GOLDEN}", "passed": None}
    try:
        golden = load_golden(bundle_root)
    except GoldenSetError as exc:
        return {"error": str(exc), "passed": False}
    results: dict[str, Any] = {}
    available = [b for b in backends if b.available]
    for backend in track(available, "golden set", "backend", enabled=progress):
        precision = backend.predictor.precision  # type: ignore[union-attr]
        output = predict_in_chunks(backend.predictor.predict, golden.inputs)  # type: ignore[union-attr]
        results[backend.name] = compare(
            golden.reference, output, candidate_name=backend.name, reference_name="golden", precision=precision,
            min_dice=required_dice(precision, min_dice_fp32, min_dice_reduced)).to_dict()
    return {"source": GOLDEN, "reference": GOLDEN_REFERENCE, "sha256": golden.sha256, "ids": list(golden.ids),
            "n_images": len(golden.ids), "results": results,
            "passed": all(entry["passed"] for entry in results.values())}


def run_parity(backends: list[Backend], batch: np.ndarray, geometries: list[Geometry], samples: list[Sample],
               *, min_dice_fp32: float, min_dice_reduced: float, progress: bool = True,
               bundle_root: Path | None = None) -> dict[str, Any]:
    """Predict with every available backend and compare each with the reference (and the golden set)."""
    available = [b for b in backends if b.available]
    reference, description = reference_description(backends)
    golden = (golden_parity(backends, bundle_root, min_dice_fp32=min_dice_fp32, min_dice_reduced=min_dice_reduced,
                            progress=progress)
              if bundle_root is not None else {"skipped": "--model is a single .onnx file, not a bundle folder",
                                               "passed": None})
    out: dict[str, Any] = {"reference": reference, "reference_description": description,
                           "threshold": DEFAULT_THRESHOLD, "n_images": len(batch), "with_truth": False,
                           "results": {}, "golden": golden}
    if reference not in {b.name for b in available}:
        out.update(error=f"the reference {reference} is not available", passed=False)
        return out
    outputs: dict[str, np.ndarray] = {}
    for backend in track(available, "parity", "backend", enabled=progress):
        outputs[backend.name] = predict_in_chunks(backend.predictor.predict, batch)  # type: ignore[union-attr]
    has_truth = any(s.truth is not None for s in samples)
    metrics = ({name: truth_metrics(probability, geometries, samples) for name, probability in outputs.items()}
               if has_truth else {})
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
    out.update(with_truth=has_truth, results=results,
               passed=all(entry.get("passed", True) for entry in results.values()) and golden["passed"] is not False)
    return out
