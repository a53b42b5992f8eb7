"""Is this mask a plausible pair of lungs? Component/area checks and a statistical shape model.

:func:`mask_qa` is the one output check used by ``lungseg-segment`` and ``lungseg-edge``. It
runs on the mask in the upright frame (after any orientation correction):

- ``not_two_lungs``        the mask does not have exactly two components;
- ``lung_size_asymmetry``  the smaller lung is under ``MIN_LUNG_RATIO`` of the larger;
- ``implausible_area``     the lungs cover less than ``MIN_LUNG_FRACTION`` or more than
                           ``MAX_LUNG_FRACTION`` of the image;
- ``implausible_shape``    the :class:`ShapeModel` (PCA of letterboxed, downsampled training
                           masks) finds the mask unlike the lung pairs it was fitted on: its
                           reconstruction residual or its Mahalanobis distance in the PCA space
                           exceeds a threshold calibrated on training data only;
- ``lung_apex_mismatch``   the tops of the two lungs lie further apart (as a fraction of the pair's
                           height) than the shape model's apex threshold (1.25 x the largest offset
                           in the training masks and in the segmenter's own masks of training
                           images), e.g. one "lung" that is really bowel gas.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.bundle import SHAPE_MODEL as SHAPE_MODEL_FILE
from lungseg.bundle import verified_file
from lungseg.postprocess import label_components
from lungseg.preprocess import Geometry

MIN_LUNG_FRACTION = 0.05
MAX_LUNG_FRACTION = 0.70
MIN_LUNG_RATIO = 0.25  # the smaller lung below this fraction of the larger is flagged
SHAPE_SIZE = 32

log = logging.getLogger(__name__)


def shape_vector(mask: np.ndarray, size: int = SHAPE_SIZE) -> np.ndarray:
    """A native-size mask -> letterboxed ``size x size`` lung coverage in [0, 1], flattened (float64)."""
    geometry = Geometry.for_shape(mask.shape[0], mask.shape[1], size)
    return geometry.to_model(mask.astype(np.float32)).astype(np.float64).ravel()


@dataclass
class ShapeModel:
    """PCA of training lung masks with calibrated thresholds."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D), orthonormal rows
    variances: np.ndarray  # (K,)
    residual_threshold: float
    mahalanobis_threshold: float
    size: int = SHAPE_SIZE
    apex_threshold: float = float("inf")

    @classmethod
    def fit(cls, vectors: np.ndarray, n_components: int = 12) -> ShapeModel:
        """PCA of ``(N, D)`` shape vectors (thresholds left infinite: see :meth:`calibrate`)."""
        mean = vectors.mean(axis=0)
        centred = vectors - mean
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        k = min(n_components, len(singular))
        variances = singular[:k] ** 2 / max(1, len(vectors) - 1)
        size = round(np.sqrt(vectors.shape[1]))
        return cls(mean, vt[:k], variances, float("inf"), float("inf"), size)

    def scores(self, vector: np.ndarray) -> tuple[float, float]:
        """(mean squared reconstruction residual, Mahalanobis distance in the PCA space)."""
        centred = vector - self.mean
        coefficients = self.components @ centred
        residual = centred - self.components.T @ coefficients
        return float(np.mean(residual ** 2)), float(np.sqrt(np.sum(coefficients ** 2 / self.variances)))

    def calibrate(self, vectors: np.ndarray, quantile: float = 0.99, margin: float = 1.15) -> dict[str, float]:
        """Thresholds = ``margin`` x the ``quantile`` of the scores of (training) ``vectors``."""
        scored = np.array([self.scores(v) for v in vectors])
        self.residual_threshold = float(np.quantile(scored[:, 0], quantile) * margin)
        self.mahalanobis_threshold = float(np.quantile(scored[:, 1], quantile) * margin)
        return {"residual_threshold": self.residual_threshold, "mahalanobis_threshold": self.mahalanobis_threshold,
                "quantile": quantile, "margin": margin, "n": len(vectors)}

    def check(self, mask: np.ndarray) -> dict[str, Any]:
        vector = shape_vector(mask, self.size)
        residual, distance = self.scores(vector)
        apex = apex_offset(vector, self.size)
        return {"residual": round(residual, 5), "mahalanobis": round(distance, 3),
                "residual_threshold": round(self.residual_threshold, 5),
                "mahalanobis_threshold": round(self.mahalanobis_threshold, 3),
                "apex_offset": None if apex is None else round(apex, 3),
                "apex_threshold": round(self.apex_threshold, 3),
                "plausible": bool(residual <= self.residual_threshold and distance <= self.mahalanobis_threshold),
                "apex_plausible": bool(apex is None or apex <= self.apex_threshold)}

    def save(self, path: str | Path) -> None:
        np.savez(path, mean=self.mean.astype(np.float32), components=self.components.astype(np.float32),
                 variances=self.variances, residual_threshold=self.residual_threshold,
                 mahalanobis_threshold=self.mahalanobis_threshold, size=self.size,
                 apex_threshold=self.apex_threshold)

    @classmethod
    def load(cls, path: str | Path) -> ShapeModel:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mean"].astype(np.float64), data["components"].astype(np.float64),
                       data["variances"].astype(np.float64), float(data["residual_threshold"]),
                       float(data["mahalanobis_threshold"]), int(data["size"]),
                       float(data["apex_threshold"]) if "apex_threshold" in data else float("inf"))


def apex_offset(vector: np.ndarray, size: int = SHAPE_SIZE) -> float | None:
    """|top of one lung - top of the other| / height of the pair, on a shape vector (None: not two lungs)."""
    import cv2

    grid = (vector.reshape(size, size) >= 0.5).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(grid, connectivity=8)
    if count - 1 < 2:
        return None
    largest = np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1][:2] + 1
    tops = stats[largest, cv2.CC_STAT_TOP]
    bottoms = tops + stats[largest, cv2.CC_STAT_HEIGHT]
    return float(abs(int(tops[0]) - int(tops[1])) / max(1, int(bottoms.max()) - int(tops.min())))


def load_shape_model(bundle_root: str | Path | None) -> ShapeModel | None:
    if bundle_root is None:
        return None
    root = Path(bundle_root)
    if not (root / SHAPE_MODEL_FILE).is_file():
        return None
    try:
        return ShapeModel.load(verified_file(root, SHAPE_MODEL_FILE))
    except Exception as exc:  # changed or broken: run without it (results are flagged shape_check_unavailable)
        log.error("the bundle's %s is not usable (%s)", SHAPE_MODEL_FILE, exc)
        return None


def mask_qa(mask: np.ndarray, shape_model: ShapeModel | None = None) -> dict[str, Any]:
    """Flags and measurements of a final (upright-frame) lung mask."""
    count, _, areas = label_components(mask)
    fraction = float(np.count_nonzero(mask)) / float(mask.size)
    flags = []
    if count != 2:
        flags.append("not_two_lungs")
    elif int(areas.min()) < MIN_LUNG_RATIO * int(areas.max()):
        flags.append("lung_size_asymmetry")  # e.g. an inverted or upside-down image, or a collapsed lung
    if not MIN_LUNG_FRACTION <= fraction <= MAX_LUNG_FRACTION:
        flags.append("implausible_area")
    report: dict[str, Any] = {"components": int(count), "lung_fraction": round(fraction, 4),
                              "min_lung_ratio": MIN_LUNG_RATIO,
                              "plausible_fraction": [MIN_LUNG_FRACTION, MAX_LUNG_FRACTION]}
    if shape_model is not None:
        shape = shape_model.check(mask) if np.any(mask) else {"plausible": False, "empty": True}
        if not shape["plausible"]:
            flags.append("implausible_shape")
        if not shape.get("apex_plausible", True):
            flags.append("lung_apex_mismatch")
        report["shape"] = shape
    return {"flags": flags, **report}
