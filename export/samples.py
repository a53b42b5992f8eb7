"""Real radiographs for parity checks, calibration and benchmarks.

A *source* is a manifest CSV (images with label masks, see :mod:`lungseg.data`),
a folder holding ``manifest.csv``, or a folder of PNG/JPEG/DICOM files. The
default is the committed fixture set ``tests/fixtures/cxr`` of the source tree the
package is installed from (an editable install); other installs pass a source.
Every image goes through :func:`lungseg.imaging.read_image` and, downstream,
:mod:`lungseg.preprocess`: the single decoding and preprocessing path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import lungseg
from lungseg.data import load_manifest, read_label_mask
from lungseg.imaging import RASTER_SUFFIXES, UnreadableImageError, read_image
from lungseg.preprocess import Geometry, preprocess_batch

log = logging.getLogger(__name__)

REPO_ROOT = Path(lungseg.__file__).resolve().parent.parent
FIXTURE_MANIFEST = REPO_ROOT / "tests" / "fixtures" / "cxr" / "manifest.csv"
SHARED_DICOM_DIR = REPO_ROOT.parent / "shared" / "data" / "dicom"
DICOM_SUFFIXES = {".dcm", ".dicom"}


class SampleSourceError(ValueError):
    """The image source is missing, empty or unreadable; the message says which and why."""


@dataclass
class Sample:
    """One decoded radiograph, with its label mask where the source has one."""

    id: str
    path: Path
    pixels: np.ndarray
    truth: np.ndarray | None = None
    valid: np.ndarray | None = None


def default_source() -> Path:
    """The committed fixture manifest, or :class:`SampleSourceError` when not installed."""
    if not FIXTURE_MANIFEST.is_file():
        raise SampleSourceError(
            f"the default radiographs ({FIXTURE_MANIFEST.relative_to(REPO_ROOT)}) are not installed "
            "with this copy of lungseg; pass a manifest CSV or a folder of radiographs"
        )
    return FIXTURE_MANIFEST


def image_files(folder: Path) -> list[Path]:
    """PNG/JPEG/DICOM files directly inside ``folder``, sorted by name."""
    suffixes = RASTER_SUFFIXES | DICOM_SUFFIXES
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def _entries(source: Path) -> list[tuple[str, Path, Path | None]]:
    if source.is_dir() and (source / "manifest.csv").is_file():
        source = source / "manifest.csv"
    if source.is_file():
        try:
            records = load_manifest(source)
        except (OSError, ValueError) as exc:
            raise SampleSourceError(f"{source}: not a usable manifest ({exc})") from exc
        return [(r.id, r.image, r.mask) for r in records]
    if source.is_dir():
        return [(p.stem, p, None) for p in image_files(source)]
    raise SampleSourceError(f"{source}: no such manifest or folder")


def load_samples(source: str | Path | None = None, limit: int | None = None,
                 with_masks: bool = True) -> list[Sample]:
    """Decode up to ``limit`` radiographs from ``source`` (default: the fixtures)."""
    source = Path(source) if source is not None else default_source()
    entries = _entries(source)[:limit]
    if not entries:
        raise SampleSourceError(f"{source}: holds no radiographs")
    samples = []
    for sample_id, image, mask in entries:
        try:
            radiograph = read_image(image)
        except UnreadableImageError as exc:
            raise SampleSourceError(str(exc)) from exc
        except ImportError as exc:  # DICOM support not installed (lungseg.dicom_decode)
            raise SampleSourceError(f"{image}: cannot decode DICOM here ({exc})") from exc
        truth = valid = None
        if with_masks and mask is not None and mask.is_file():
            truth, valid = read_label_mask(mask)
        samples.append(Sample(sample_id, Path(image), radiograph.pixels, truth, valid))
    log.info("loaded %d radiographs from %s", len(samples), source)
    return samples


def model_batch(samples: list[Sample]) -> tuple[np.ndarray, list[Geometry]]:
    """``(N, 3, S, S)`` float32 model input for ``samples`` (via :mod:`lungseg.preprocess`)."""
    return preprocess_batch([s.pixels for s in samples])


def describe_source(source: str | Path | None) -> str:
    """A machine-independent name for a source: relative to the source tree when beside it."""
    if source is None:
        return str(FIXTURE_MANIFEST.relative_to(REPO_ROOT))
    path = Path(source).resolve()
    if path.is_relative_to(REPO_ROOT.parent):
        return os.path.relpath(path, REPO_ROOT)
    return str(source)
