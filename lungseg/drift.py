"""Drift descriptors, the bundle's reference distribution and the statistic that compares them (no torch).

Each processed image gives a few numbers (:func:`describe`): intensity statistics of the presentation
pixels at model scale (long side 256, as :mod:`lungseg.preprocess` sees them), a robust noise estimate,
the native resolution and aspect, and, when a mask is given, the lung fraction and whether QA flagged it.
``lungseg-export drift-reference`` bins the training images' descriptors at their reference deciles and
ships the bin edges and proportions as ``drift_reference.json`` in the bundle (hashed in ``bundle.json``);
no image-level value leaves the training data.

**Statistic: the population stability index** (PSI) per descriptor, over the reference's bins:
``PSI = sum_i (p_i - q_i) ln(p_i / q_i)`` (p recent, q reference, both smoothed by half a count). PSI is
chosen over a KS statistic because it needs only the binned reference (small, shippable, no raw training
values), handles a 0/1 descriptor (flag rate) like a continuous one, and is the statistic monitoring teams
already read. For a window of n images against a reference of m, ``n * m / (n + m) * PSI`` is close to a
chi-square with ``bins - 1`` degrees of freedom when nothing drifted, so a descriptor's **threshold** is that
distribution's 99.9th percentile scaled by ``1/n + 1/m`` (never below :data:`PSI_FLOOR`, 0.1, the usual "some
change" level): small windows get a higher bar, and the rate of false alarms does not depend on the window.
**Combined score**: ``max(mean_d r_d, max_d r_d / 2)`` with ``r_d = PSI_d / threshold_d`` — at least 1 when
the descriptors exceed their thresholds on average, or one exceeds its own twice over; an alarm is a
combined score >= 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lungseg.atomic import atomic_write
from lungseg.data import read_label_mask
from lungseg.imaging import read_image

REFERENCE_FILE = "drift_reference.json"
SCHEMA = "lungseg/drift-reference/1"
MODEL_SIDE = 256
BINS = 10
PSI_FLOOR = 0.1
ALARM_QUANTILE_Z = 3.090  # standard normal 99.9th percentile, for the Wilson-Hilferty chi-square quantile
INPUT_DESCRIPTORS = ("intensity_mean", "intensity_std", "intensity_p05", "intensity_p95", "noise",
                     "log2_long_side", "aspect")
OUTPUT_DESCRIPTORS = ("lung_fraction", "flagged")
DESCRIPTORS = INPUT_DESCRIPTORS + OUTPUT_DESCRIPTORS


def _model_scale(pixels: np.ndarray) -> np.ndarray:
    rows, cols = pixels.shape[:2]
    scale = MODEL_SIDE / max(rows, cols)
    if scale >= 1.0:
        return pixels.astype(np.float32, copy=False)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    return cv2.resize(pixels.astype(np.float32, copy=False), size, interpolation=cv2.INTER_AREA)


def describe(pixels: np.ndarray, native_shape: tuple[int, int] | None = None, mask: np.ndarray | None = None,
             flagged: bool | None = None) -> dict[str, float]:
    """The descriptors of one image: ``pixels`` float in [0, 1] (MONOCHROME2, as decoded), ``native_shape`` the
    source's rows x columns (default ``pixels.shape``), ``mask`` any-size lung mask, ``flagged`` QA said review."""
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"describe: expected a 2-D image, got shape {pixels.shape}")
    small = _model_scale(pixels)
    rows, cols = native_shape or pixels.shape[:2]
    lo, hi = np.percentile(small, (5, 95))
    laplacian = cv2.Laplacian(small, cv2.CV_32F, ksize=1)
    out = {
        "intensity_mean": float(small.mean()), "intensity_std": float(small.std()),
        "intensity_p05": float(lo), "intensity_p95": float(hi),
        # median absolute Laplacian: robust noise level, barely moved by edges (most pixels are not on one)
        "noise": float(np.median(np.abs(laplacian))),
        "log2_long_side": float(math.log2(max(rows, cols))), "aspect": float(rows / cols),
    }
    if mask is not None:
        out["lung_fraction"] = float(np.count_nonzero(mask) / mask.size)
    if flagged is not None:
        out["flagged"] = float(bool(flagged))
    return out


def _chi2_quantile(dof: int, z: float = ALARM_QUANTILE_Z) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal ``z``."""
    k = float(max(dof, 1))
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


@dataclass(frozen=True)
class Binned:
    """One descriptor of a reference: inner bin edges (``len(edges) + 1`` bins) and the reference's counts."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    def histogram(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """Counts of ``values`` in these bins (right-closed: a value equal to an edge goes left)."""
        index = np.searchsorted(np.asarray(self.edges, dtype=np.float64), np.asarray(values, np.float64),
                                side="left")
        return np.bincount(index, minlength=len(self.edges) + 1)

    def psi(self, values: Sequence[float] | np.ndarray) -> float:
        """PSI of ``values`` against this reference (half-count smoothing on both sides)."""
        recent = self.histogram(values).astype(np.float64) + 0.5
        ref = np.asarray(self.counts, np.float64) + 0.5
        p, q = recent / recent.sum(), ref / ref.sum()
        return float(np.sum((p - q) * np.log(p / q)))

    def threshold(self, n: int) -> float:
        """Alarm level of :meth:`psi` for a window of ``n`` (see the module docstring)."""
        bins = len(self.counts)
        return max(PSI_FLOOR, _chi2_quantile(bins - 1) * (1.0 / max(n, 1) + 1.0 / max(self.total, 1)))


def fit_binned(values: Sequence[float] | np.ndarray, bins: int = BINS, edges: Sequence[float] | None = None) -> Binned:
    """Bin ``values`` at their own quantiles (distinct edges only; a 0/1 descriptor gets one edge), or at ``edges``."""
    data = np.asarray(values, np.float64)
    if data.size == 0:
        raise ValueError("fit_binned: no values")
    if edges is None:
        cuts = np.unique(np.quantile(data, np.linspace(0, 1, bins + 1)[1:-1]))
        # a right-closed edge at the maximum would leave the last bin empty
        edges = [float(c) for c in cuts if c < data.max()] or [float(data.min())]
    binned = Binned(tuple(float(e) for e in edges), ())
    return Binned(binned.edges, tuple(int(c) for c in binned.histogram(data)))


@dataclass(frozen=True)
class Reference:
    """A reference distribution: per descriptor, its bins and counts."""

    descriptors: dict[str, Binned]
    source: str = ""
    images: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "source": self.source, "images": self.images, "bins": BINS,
                "statistic": "psi", "psi_floor": PSI_FLOOR,
                "descriptors": {k: {"edges": list(v.edges), "counts": list(v.counts)}
                                for k, v in sorted(self.descriptors.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "drift reference") -> Reference:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{where}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
        try:
            descriptors = {str(k): Binned(tuple(float(e) for e in v["edges"]), tuple(int(c) for c in v["counts"]))
                           for k, v in data["descriptors"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: malformed descriptors ({exc})") from exc
        for name, binned in descriptors.items():
            if len(binned.counts) != len(binned.edges) + 1 or binned.total <= 0:
                raise ValueError(f"{where}: descriptor {name!r} has {len(binned.edges)} edges and "
                                 f"{len(binned.counts)} counts (total {binned.total})")
        return cls(descriptors, str(data.get("source", "")), int(data.get("images", 0)))

    def write(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def read(cls, path: Path) -> Reference:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable drift reference ({exc})") from exc
        return cls.from_json(data, str(path))

    def rebinned(self, rows: Sequence[Mapping[str, float]], source: str) -> Reference:
        """A reference with these bins and the counts of ``rows`` (a site's own baseline); a descriptor this
        reference lacks (the QA flag rate: training images have no QA) is binned at the rows' own quantiles."""
        out = {}
        for name in DESCRIPTORS:
            values = [r[name] for r in rows if name in r]
            if values:
                binned = self.descriptors.get(name)
                out[name] = fit_binned(values, edges=binned.edges if binned else None)
        return Reference(out, source, len(rows))


def build_reference(rows: Sequence[Mapping[str, float]], source: str, bins: int = BINS) -> Reference:
    """A reference from descriptor rows (each descriptor present in at least half the rows is kept)."""
    names = [n for n in DESCRIPTORS if sum(1 for r in rows if n in r) * 2 >= max(len(rows), 1)]
    if not rows or not names:
        raise ValueError(f"build_reference: no descriptors in {len(rows)} rows")
    return Reference({n: fit_binned([r[n] for r in rows if n in r], bins) for n in names}, source, len(rows))


@dataclass(frozen=True)
class Comparison:
    """A window against a reference: PSI and threshold per descriptor, and the combined score."""

    n: int
    psi: dict[str, float]
    threshold: dict[str, float]

    @property
    def ratios(self) -> dict[str, float]:
        return {k: self.psi[k] / self.threshold[k] for k in self.psi}

    @property
    def score(self) -> float:
        ratios = list(self.ratios.values())
        return max(sum(ratios) / len(ratios), max(ratios) / 2) if ratios else 0.0

    @property
    def alarm(self) -> bool:
        return self.score >= 1.0

    def to_json(self) -> dict[str, Any]:
        return {"images": self.n, "score": round(self.score, 4), "alarm": self.alarm,
                "descriptors": {k: {"psi": round(self.psi[k], 4), "threshold": round(self.threshold[k], 4)}
                                for k in sorted(self.psi)}}


def compare(reference: Reference, rows: Iterable[Mapping[str, float]], min_images: int = 1) -> Comparison | None:
    """Compare a window of descriptor rows with ``reference``; ``None`` with fewer than ``min_images`` rows."""
    window = list(rows)
    if len(window) < max(min_images, 1):
        return None
    psi, threshold = {}, {}
    for name, binned in reference.descriptors.items():
        values = [r[name] for r in window if name in r]
        if len(values) >= max(min_images, 1):
            psi[name] = binned.psi(values)
            threshold[name] = binned.threshold(len(values))
    return Comparison(len(window), psi, threshold)


def record_rows(records: Iterable[Any], transform: Any = None) -> list[dict[str, float]]:
    """Descriptor rows of manifest records (:class:`lungseg.data.Record`): image and ground-truth lung mask
    (the reference's ``lung_fraction``; QA flags are not known for training images). ``transform(pixels)``
    optionally changes each image first (for shifted evaluation streams)."""
    rows = []
    for record in records:
        pixels = read_image(record.image).pixels
        native = pixels.shape[:2]
        if transform is not None:
            pixels = transform(pixels)
        lung, _valid = read_label_mask(record.mask)
        rows.append(describe(pixels, pixels.shape[:2] if transform is not None else native, mask=lung))
    return rows
