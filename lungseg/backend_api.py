"""The inference backends' shared vocabulary: the predictor interface, options and errors.

Kept apart from :mod:`lungseg.predictors` (which chooses among backends) so that a backend
module such as :mod:`lungseg.tensorrt_runtime` can use them without importing the chooser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lungseg.errors import LungsegError


class BackendUnavailableError(LungsegError, RuntimeError):
    """The requested backend cannot run here; the message says why."""


class BackendRuntimeError(LungsegError, RuntimeError):
    """A backend failed while running (e.g. a CUDA error): the caller should demote, not blame the input."""


class Predictor(Protocol):
    """``predict`` maps ``(N, 3, S, S)`` float32 model input to ``(N, S, S)`` probabilities.

    ``backend``, ``precision`` and ``model_path`` are read-only here: a plain attribute and a
    property (:class:`lungseg.predictors.FallbackPredictor`'s, which follow its demotions) both fit.
    """

    @property
    def backend(self) -> str: ...

    @property
    def precision(self) -> str: ...

    @property
    def model_path(self) -> str: ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class BackendOptions:
    """Settings of the GPU backends (the CPU ones need only ``threads``)."""

    threads: int | None = None
    gpu_mem_limit_mb: int | None = None
    cudnn_conv_algo_search: str = "HEURISTIC"
    engine_cache: Path | None = None
    dla_core: int | None = None
    cuda_graph: bool = False
    selftest: bool = True
    # among the CPU candidates: "fastest" (self-test and time each at start-up; used where OpenVINO is installed),
    # "chain" (the first that passes, in lungseg.predictors.CHAINS order) or one candidate's name, pinned first
    cpu_choice: str = "fastest"
    # "fastest" without a measurement kept from an earlier start: serve the chain's first candidate at once and
    # measure on a thread, switching to the fastest when done (the service: ready in about a second);
    # False measures before serving (one-shot runs, whose reports name the measured choice)
    measure_in_background: bool = False
    # called every few seconds with a status line while a TensorRT engine builds (the edge service
    # extends systemd's start timeout with it; building on an Orin Nano takes minutes)
    build_keepalive: Callable[[str], object] | None = None


__all__ = ["BackendOptions", "BackendRuntimeError", "BackendUnavailableError", "Predictor"]
