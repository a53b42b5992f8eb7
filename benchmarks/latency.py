"""Latency: per pipeline stage for one image at a time, and per backend at several batch sizes.

Stages are those of every front end: ``decode`` (:func:`lungseg.imaging.read_image`),
``preprocess``/``infer``/``postprocess`` (timed inside
:func:`lungseg.inference.segment_batch`) and ``write`` (the mask PNG). Each
measurement is preceded by an untimed warm-up.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.export.timing import summary_ms, time_calls
from lungseg.predictors import Predictor

STAGES = ("decode", "preprocess", "infer", "postprocess", "write")
DEFAULT_BATCH_SIZES = (1, 4, 8)


def default_repeats(batch_size: int) -> int:
    """Timed runs per batch size: enough for ~8 images, at least 2 runs."""
    return max(2, math.ceil(8 / batch_size))


def pipeline_latency(predictor: Predictor, paths: Sequence[Path], out_dir: Path, *, warmup: int = 1,
                     progress: bool = True) -> dict[str, dict[str, float]]:
    """p50/p95 of each stage over ``paths``, one image per call (batch 1)."""
    import cv2
    from tqdm import tqdm

    from lungseg.imaging import read_image
    from lungseg.inference import segment_batch

    times: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "total")}
    runs = [paths[0]] * warmup + list(paths)
    for index, path in enumerate(tqdm(runs, desc="stages", unit="image", disable=not progress)):
        start = time.perf_counter()
        radiograph = read_image(path)
        decoded = time.perf_counter()
        segmentation = segment_batch(predictor, [radiograph])[0]
        segmented = time.perf_counter()
        cv2.imwrite(str(out_dir / f"{path.stem}_mask.png"), segmentation.mask.astype(np.uint8) * 255)
        written = time.perf_counter()
        if index < warmup:
            continue
        times["decode"].append((decoded - start) * 1000)
        for stage in ("preprocess", "infer", "postprocess"):
            times[stage].append(segmentation.timings_ms[stage])
        times["write"].append((written - segmented) * 1000)
        times["total"].append((written - start) * 1000)
    return {stage: summary_ms(values) for stage, values in times.items()}


def decode_latency(paths: Sequence[Path], *, repeats: int = 1) -> dict[str, Any]:
    """Per-file decode time of (DICOM) files through :func:`read_image`, after one warm-up read."""
    from lungseg.imaging import UnreadableImageError, read_image

    times, per_file, errors = [], {}, {}
    for path in paths:
        try:
            read_image(path)
            file_times = time_calls(lambda p=path: read_image(p), repeats=repeats, warmup=0)
        except (ImportError, UnreadableImageError) as exc:
            errors[path.name] = str(exc)
            continue
        times.extend(file_times)
        per_file[path.name] = float(np.median(file_times))
    return {**summary_ms(times), "per_file_ms": per_file, "errors": errors}


def batch_latency(predictor: Predictor, images: np.ndarray, *, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                  repeats: int | None = None) -> dict[str, dict[str, float]]:
    """Inference time per call at each batch size (images tiled from ``images``)."""
    out = {}
    for size in batch_sizes:
        batch = np.ascontiguousarray(images[np.arange(size) % len(images)])
        summary = summary_ms(time_calls(lambda b=batch: predictor.predict(b),
                                        repeats=repeats or default_repeats(size), warmup=1))
        summary["per_image_ms"] = summary["p50_ms"] / size
        summary["images_per_s"] = 1000.0 * size / summary["p50_ms"]
        out[str(size)] = summary
    return out


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (MiB), and of torch's CUDA allocator where used."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"max_rss_mib": rss_kib / (1024 * 1024) if sys.platform == "darwin" else rss_kib / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        result["torch_cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result
