"""The bundle's golden set and the start-up self-test that every backend must pass before it serves.

``golden.npz`` (written by ``lungseg-export``) holds a few preprocessed radiographs
from the committed CC BY 4.0 fixtures (one channel, float16: the model repeats it
to three) and the fp32 PyTorch probabilities computed from exactly those inputs.
:func:`run_selftest` runs a predictor on them and compares the masks (threshold
0.5) with the reference: a backend whose mean or worst mask Dice falls below its
precision's bar is not used. The same arrays are the reference outputs a freshly
built TensorRT engine is checked against before its first use.

Numpy only (and the predictor under test): no torch, no onnx.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.atomic import atomic_write
from lungseg.bundle import GOLDEN, verified_file
from lungseg.metrics import dice
from lungseg.preprocess import CHANNELS

log = logging.getLogger(__name__)

THRESHOLD = 0.5
# (minimum mean mask Dice, minimum worst-image mask Dice) against the fp32 reference
REQUIRED = {"fp32": (0.999, 0.995), "fp16": (0.99, 0.98), "int8": (0.995, 0.98)}
GOLDEN_SCHEMA = "lungseg/golden/1"


class GoldenSetError(ValueError):
    """The bundle's golden set is missing, altered or malformed; the message says which."""


@dataclass(frozen=True)
class GoldenSet:
    """``inputs`` (N, 3, S, S) float32 model input; ``reference`` (N, S, S) float32 probabilities."""

    ids: tuple[str, ...]
    inputs: np.ndarray
    reference: np.ndarray
    sha256: str


@dataclass(frozen=True)
class SelfTestResult:
    """Outcome of one backend's self-test (JSON-friendly through :meth:`to_dict`)."""

    backend: str
    precision: str
    model_file: str
    passed: bool
    n_images: int = 0
    dice_mean: float | None = None
    dice_min: float | None = None
    abs_diff_max: float | None = None
    required: tuple[float, float] | None = None
    seconds: float = 0.0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.dice_mean is None or self.required is None:
            return f"{self.backend}/{self.precision}: {'pass' if self.passed else 'FAIL'} ({self.reason})"
        return (f"{self.backend}/{self.precision}: mean Dice {self.dice_mean:.4f}, min {self.dice_min:.4f} "
                f"(need {self.required[0]}/{self.required[1]}) on {self.n_images} images in "
                f"{self.seconds:.2f} s -> {'pass' if self.passed else 'FAIL'}"
                + (f" ({self.reason})" if self.reason else ""))


def write_golden(path: Path, ids: Sequence[str], inputs: np.ndarray, reference_predict: Any) -> dict[str, Any]:
    """Write ``golden.npz`` from ``(N, 3, S, S)`` model inputs; ``reference_predict`` gives fp32 probabilities.

    The inputs are stored as one float16 channel; the reference is computed from those stored
    values, so every backend later sees exactly the inputs the reference saw.
    """
    if inputs.ndim != 4 or inputs.shape[1] != CHANNELS or not np.allclose(inputs[:, 0], inputs[:, -1]):
        raise GoldenSetError(f"golden inputs must be (N, {CHANNELS}, S, S) with identical channels")
    stored = inputs[:, 0].astype(np.float16)
    reference = np.asarray(reference_predict(_expand(stored)), dtype=np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, schema=np.array(GOLDEN_SCHEMA), ids=np.array(list(ids)), inputs=stored,
                        reference=reference.astype(np.float16))
    data = buffer.getvalue()
    atomic_write(path, data)
    return {"file": path.name, "ids": list(ids), "n_images": len(ids), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def _expand(stored: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(stored.astype(np.float32)[:, None], CHANNELS, axis=1))


def load_golden(root: Path) -> GoldenSet:
    """The golden set of the bundle folder ``root``, checked against ``bundle.json``."""
    try:
        path = verified_file(root, GOLDEN)
        data = path.read_bytes()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            schema = str(npz["schema"])
            ids, stored, reference = tuple(str(i) for i in npz["ids"]), npz["inputs"], npz["reference"]
    except (OSError, KeyError) as exc:
        raise GoldenSetError(f"{GOLDEN}: unreadable ({exc})") from exc
    except ValueError as exc:
        raise GoldenSetError(str(exc)) from exc
    if schema != GOLDEN_SCHEMA or stored.ndim != 3 or reference.shape != stored.shape or len(ids) != len(stored):
        raise GoldenSetError(f"{GOLDEN}: unexpected content (schema {schema!r}, inputs {stored.shape}, "
                             f"reference {reference.shape})")
    return GoldenSet(ids, _expand(stored), reference.astype(np.float32), hashlib.sha256(data).hexdigest())


def compare_masks(reference: np.ndarray, candidate: np.ndarray, precision: str) -> dict[str, Any]:
    """Mask Dice (mean, min) and max |Δp| of ``candidate`` vs ``reference``; ``passed`` per :data:`REQUIRED`."""
    if candidate.shape != reference.shape:
        raise ValueError(f"output shape {candidate.shape} != reference {reference.shape}")
    dices = np.array([dice(r >= THRESHOLD, c >= THRESHOLD) for r, c in zip(reference, candidate, strict=True)])
    need_mean, need_min = REQUIRED.get(precision, REQUIRED["fp16"])
    finite = bool(np.isfinite(candidate).all())
    mean, worst = float(dices.mean()), float(dices.min())
    return {"dice_mean": mean, "dice_min": worst,
            "abs_diff_max": float(np.abs(reference - candidate).max()) if finite else float("inf"),
            "required": (need_mean, need_min), "finite": finite,
            "passed": bool(finite and mean >= need_mean and worst >= need_min)}


def run_selftest(predictor: Any, golden: GoldenSet, batch: int = 4, limit: int | None = None) -> SelfTestResult:
    """Run ``predictor`` on the golden set (its first ``limit`` images); never raises.

    A crash is a failed self-test with its reason.
    """
    backend, precision = str(predictor.backend), str(predictor.precision)
    model_file = Path(str(getattr(predictor, "model_path", "?"))).name
    inputs, reference = golden.inputs[:limit], golden.reference[:limit]
    start = time.perf_counter()
    try:
        outputs = np.concatenate([np.asarray(predictor.predict(inputs[i:i + batch]), dtype=np.float32)
                                  for i in range(0, len(inputs), batch)])
        stats = compare_masks(reference, outputs, precision)
    except Exception as exc:  # a backend that cannot even run the golden set fails its self-test
        return SelfTestResult(backend, precision, model_file, False, len(inputs),
                              seconds=time.perf_counter() - start, reason=f"{type(exc).__name__}: {exc}")
    reason = "" if stats["passed"] else ("non-finite output" if not stats["finite"] else "masks differ from reference")
    return SelfTestResult(backend, precision, model_file, stats["passed"], len(inputs), stats["dice_mean"],
                          stats["dice_min"], stats["abs_diff_max"], stats["required"],
                          time.perf_counter() - start, reason)


__all__ = ["GOLDEN_SCHEMA", "REQUIRED", "GoldenSet", "GoldenSetError", "SelfTestResult", "compare_masks",
           "load_golden", "run_selftest", "write_golden"]
