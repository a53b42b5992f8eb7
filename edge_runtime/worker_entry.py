"""The decode worker process's entry point (:class:`~lungseg.edge_runtime.isolate.DecodeWorker`).

A spawned process imports its target's module, and the modules of its arguments' classes,
before the target runs; numeric and image libraries (OpenBLAS, OpenMP, OpenCV) size their
thread pools, and reserve memory for each thread, when they load. The worker runs one
thread under an address-space limit, so its one-thread settings must be in the environment
before any of them loads: this module imports nothing but the standard library, its
arguments are plain values, and it imports the decoder (and with it NumPy, pydicom and
OpenCV) only after setting them. :func:`lungseg.edge_runtime.decoding.run_worker` then loads
every decoder library and sets the memory limit before taking input.
"""

from __future__ import annotations

import os
from typing import Any

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def main(conn: Any, memory_bytes: int, limits: dict[str, int]) -> None:  # pragma: no cover - runs in the worker
    """Set one thread per library, then serve decode requests on ``conn`` (``limits``: DecodeLimits' fields)."""
    for var in THREAD_VARIABLES:
        os.environ.setdefault(var, "1")
    from lungseg.edge_runtime.decoding import run_worker  # here: only once the thread limits are set

    run_worker(conn, memory_bytes, limits)
