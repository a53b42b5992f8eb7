"""Latency of inference per backend at several batch sizes, and the benchmark's peak memory.

The DICOM path's stages are timed in :mod:`lungseg.benchmarks.dicom_path` (through
``lungseg-edge`` itself). Each measurement is preceded by an untimed warm-up.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Sequence

import numpy as np

from lungseg.export.timing import summary_ms, time_calls
from lungseg.predictors import Predictor

DEFAULT_BATCH_SIZES = (1, 4, 8)


def default_repeats(batch_size: int) -> int:
    """Timed runs per batch size: enough for ~8 images, at least 2 runs."""
    return max(2, math.ceil(8 / batch_size))


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
