"""Wall-clock timing helpers shared by the export's speed check and the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np


def time_calls(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times; returns milliseconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def summary_ms(times: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / mean / n of a list of milliseconds."""
    values = np.asarray(times, dtype=np.float64)
    if values.size == 0:
        return {"n": 0}
    p50, p95 = np.percentile(values, (50, 95))
    return {"p50_ms": float(p50), "p95_ms": float(p95), "mean_ms": float(values.mean()), "n": int(values.size)}
