"""The drift monitor of the box: recent images' descriptors against the bundle's reference and the site's own.

Every processed image's descriptors (:func:`lungseg.drift.describe`: numbers only, no UID or name) are appended
to ``<state>/drift/descriptors.jsonl`` with the time. Two windows are compared (:func:`lungseg.drift.compare`,
PSI per descriptor and a combined score, alarm at score >= 1) with two references: the bundle's
``drift_reference.json`` ("bundle") and, once ``drift_site_after`` images were seen, the site's own first images
binned the same way, plus the QA flag rate the bundle cannot know (``<state>/drift/site_reference.json``,
"site"). Windows: the last ``drift_window`` images
("count") and the images of the last 24 hours ("day"; at most :data:`DAY_CAP`). Without a reference in the bundle
the monitor is off, said once in the log.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lungseg import drift
from lungseg.atomic import atomic_write
from lungseg.bundle import verified_file

from . import service_metrics

log = logging.getLogger("lungseg.edge.drift")

FOLDER = "drift"
ROWS_FILE = "descriptors.jsonl"
SITE_FILE = "site_reference.json"
DAY_SECONDS = 86400.0
DAY_CAP = 5000
MIN_IMAGES = 20  # no comparison on fewer images (the threshold would be mostly the small-window term)
WINDOWS = ("count", "day")


class DriftMonitor:
    """Rolling windows of descriptor rows, compared with the bundle's reference and the site baseline."""

    def __init__(self, reference: drift.Reference, folder: Path, window: int = 100, site_after: int = 500) -> None:
        self.reference = reference
        self.folder = folder
        self.window = int(window)
        self.site_after = int(site_after)
        self.site: drift.Reference | None = None
        self.recent: deque[dict[str, float]] = deque(maxlen=max(self.window, DAY_CAP))
        self.seen = 0
        self._first: list[dict[str, float]] = []
        self._lines = 0
        folder.mkdir(parents=True, exist_ok=True)
        self._load()

    @property
    def rows_path(self) -> Path:
        return self.folder / ROWS_FILE

    def _load(self) -> None:
        site = self.folder / SITE_FILE
        if site.is_file():
            try:
                self.site = drift.Reference.read(site)
            except ValueError as exc:
                log.warning("drift: site baseline ignored: %s", exc)
        if not self.rows_path.is_file():
            return
        with self.rows_path.open() as fh:
            for number, line in enumerate(fh, 1):
                try:
                    row = {str(k): float(v) for k, v in json.loads(line).items()}
                except (ValueError, AttributeError, TypeError):
                    log.warning("drift: %s:%d unreadable, skipped", self.rows_path, number)
                    continue
                self._add(row)
                self._lines += 1

    def _compact(self) -> None:
        """Keep only the rows the windows still use (the site baseline is frozen by then)."""
        atomic_write(self.rows_path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self.recent))
        self._lines = len(self.recent)

    def _add(self, row: dict[str, float]) -> None:
        self.seen += 1
        self.recent.append(row)
        if self.site is None and self.site_after > 0:
            self._first.append(row)
            if len(self._first) >= self.site_after:
                self.site = self.reference.rebinned(self._first, f"site baseline: first {len(self._first)} images")
                self.site.write(self.folder / SITE_FILE)
                self._first = []
                log.info("drift: site baseline frozen from the first %d images", self.site.images)

    def observe(self, descriptors: dict[str, float], now: float | None = None) -> None:
        """Add one image's descriptors (appended to the rows file), then publish the gauges."""
        row = {"t": float(time.time() if now is None else now), **descriptors}
        with self.rows_path.open("a") as fh:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
        self._add(row)
        self._lines += 1
        if self._lines > 4 * DAY_CAP and (self.site is not None or self.site_after <= 0):
            self._compact()
        service_metrics.set_drift(self.comparisons(row["t"]))

    def windows(self, now: float | None = None) -> dict[str, list[dict[str, float]]]:
        """The count window (last ``window`` rows) and the day window (rows of the last 24 h)."""
        now = time.time() if now is None else now
        rows = list(self.recent)
        return {"count": rows[-self.window:], "day": [r for r in rows if r.get("t", 0.0) >= now - DAY_SECONDS]}

    def comparisons(self, now: float | None = None) -> dict[tuple[str, str], drift.Comparison | None]:
        """(reference, window) -> the comparison (``None`` below :data:`MIN_IMAGES` or before the site baseline)."""
        out: dict[tuple[str, str], drift.Comparison | None] = {}
        for window, rows in self.windows(now).items():
            out[("bundle", window)] = drift.compare(self.reference, rows, MIN_IMAGES)
            out[("site", window)] = drift.compare(self.site, rows, MIN_IMAGES) if self.site else None
        return out

    def report(self, now: float | None = None) -> dict[str, Any]:
        """What ``lungseg-edge drift --json`` prints."""
        return {"images_seen": self.seen, "window": self.window, "site_after": self.site_after,
                "reference": {"source": self.reference.source, "images": self.reference.images},
                "site_baseline": None if self.site is None else {"images": self.site.images},
                "comparisons": {f"{ref}/{win}": (c.to_json() if c else None)
                                for (ref, win), c in self.comparisons(now).items()}}


def reference_of(bundle_root: Path | None) -> tuple[drift.Reference | None, str]:
    """The bundle's drift reference, or ``None`` and why not."""
    if bundle_root is None or not bundle_root.is_dir():
        return None, "the model is a bare ONNX file, not a bundle"
    if not (bundle_root / drift.REFERENCE_FILE).is_file():
        return None, f"the bundle has no {drift.REFERENCE_FILE} (export it with lungseg-export --drift-reference)"
    try:
        return drift.Reference.read(verified_file(bundle_root, drift.REFERENCE_FILE)), ""
    except ValueError as exc:
        return None, str(exc)


_monitor: DriftMonitor | None = None


def start(bundle_root: Path | None, state_dir: Path, window: int, site_after: int) -> DriftMonitor | None:
    """Start the service's monitor; off (said once, in the log) when the bundle has no usable reference."""
    global _monitor
    reference, why = reference_of(bundle_root)
    if reference is None:
        log.warning("drift monitor off: %s", why)
        _monitor = None
        return None
    _monitor = DriftMonitor(reference, state_dir / FOLDER, window, site_after)
    log.info("drift monitor on: %d descriptors, window %d images and 24 h, site baseline after %d images",
             len(reference.descriptors), window, site_after)
    return _monitor


def stop() -> None:
    global _monitor
    _monitor = None


def observe(pixels: np.ndarray, native_shape: Sequence[int] | None, mask: np.ndarray | None,
            flags: Sequence[str]) -> None:
    """One processed image (no-op while the monitor is off); a failure is logged, never raised."""
    monitor = _monitor
    if monitor is None:
        return
    try:
        shape = (int(native_shape[0]), int(native_shape[1])) if native_shape else None
        monitor.observe(drift.describe(pixels, shape, mask, bool(flags)))
    except Exception as exc:  # monitoring must never cost a file its outputs
        log.warning("drift: image not recorded: %s: %s", type(exc).__name__, exc)
