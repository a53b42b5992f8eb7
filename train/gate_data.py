"""Self-labelled data for the image gate: chest radiographs, their faults, and things that are not chests.

Labels are generated, not annotated. A chest radiograph from the manifest is the positive
class; each sample is rendered through the core decode/preprocess path
(:func:`lungseg.gate.gate_input_from_pixels`), optionally as a negative (``1 - pixels``), and
at batch time turned by one of the 8 dihedral transforms (quarter turns, with or without a
left-right mirror). Not-chest samples are small crops of radiographs (a region zoomed far
beyond a chest), synthetic images, and real non-chest DICOM images shipped under the MIT
licence with ``pydicom`` and ``pydicom-data`` (CT, MR, ultrasound, nuclear medicine, an
extremity radiograph, a photograph).

Patients: :func:`gate_split` holds out exactly the images the shipped segmenter was never
trained on (the stage-1 test split of repetition 0 and the independent portable half), so
the gate's held-out scores and the fault set built from them never touch a training patient.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lungseg.data import Record, load_manifest, read_label_mask
from lungseg.gate import gate_input_from_pixels
from lungseg.imaging import UnreadableImageError, read_image, to_unit_range
from lungseg.train.config import TrainConfig
from lungseg.train.protocol import plan_data, stage_split

log = logging.getLogger(__name__)

# Real non-chest DICOM images from pydicom's test files and the pydicom-data package (MIT).
# Distinct images only; the held-out list is never trained on.
NONCHEST_TRAIN = (
    "MR2_UNCR.dcm", "693_UNCR.dcm", "OBXXXX1A.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "JPEG2000_UNC.dcm",
    "CT_small.dcm", "explicit_VR-UN.dcm", "emri_small.dcm", "OT-PAL-8-face.dcm", "gdcm-US-ALOKA-16.dcm",
    "mlut_18.dcm",
)
NONCHEST_HELDOUT = (
    "RG3_UNCR.dcm", "US1_UNCR.dcm", "J2K_pixelrep_mismatch.dcm", "eCT_Supplemental.dcm", "examples_jpeg2k.dcm",
    "examples_palette.dcm",
)


@dataclass
class GateSplit:
    """Records the gate trains on, and the held-out ones (patient-disjoint)."""

    train: list[Record]
    heldout: list[Record]


def gate_split(manifest: str | Path, seed: int = 0) -> GateSplit:
    """Hold out what the segmenter never trained on: stage-1 test split (repetition 0) + independent half."""
    records = load_manifest(manifest)
    config = TrainConfig(manifest=str(manifest), seed=seed)
    plan = plan_data(records, config)
    stage1_train, stage1_val, stage1_test = stage_split(plan.stage1, config, "stage1", 0)
    heldout = sorted(stage1_test + plan.independent, key=lambda r: r.id)
    held_patients = {r.patient_id for r in heldout}
    train = sorted((r for r in stage1_train + stage1_val + plan.stage2 if r.patient_id not in held_patients),
                   key=lambda r: r.id)
    return GateSplit(train=train, heldout=heldout)


def dicom_search_dirs() -> list[Path]:
    """Folders holding pydicom's and pydicom-data's test files (where installed)."""
    dirs = []
    try:
        import pydicom

        dirs.append(Path(pydicom.__file__).parent / "data" / "test_files")
    except ImportError:  # pragma: no cover - pydicom is a core dependency
        pass
    try:
        import data_store  # the import name of pydicom-data

        dirs.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        log.warning("pydicom-data is not installed: fewer real non-chest images")
    return dirs


def read_any_dicom(path: Path) -> np.ndarray:
    """First frame of any DICOM as float32 [0, 1] gray (colour converted); for training data only."""
    import pydicom

    try:
        return read_image(path).pixels
    except (UnreadableImageError, ValueError, NotImplementedError):
        pass
    ds = pydicom.dcmread(str(path), force=True)
    array = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        array = array[len(array) // 2]
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        array = apply_color_lut(array, ds)
    elif photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        array = convert_color_space(array, photometric, "RGB")
    if array.ndim == 3:
        array = cv2.cvtColor(to_unit_range(array[..., :3]), cv2.COLOR_RGB2GRAY)
    pixels = to_unit_range(array)
    return 1.0 - pixels if photometric == "MONOCHROME1" else pixels


def find_nonchest(names: Iterable[str]) -> list[Path]:
    found = []
    dirs = dicom_search_dirs()
    for name in names:
        hits = [d / name for d in dirs if (d / name).is_file()]
        if hits:
            found.append(hits[0])
        else:
            log.warning("non-chest image %s not found", name)
    return found


# --- photometric / geometric augmentations on native [0, 1] pixels -------------------------------
def _photometric(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.clip(pixels, 0.0, 1.0) ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.3:
        out = out + rng.normal(0.0, rng.uniform(0.005, 0.03), out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _frame(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A chest as a unit may frame it: a little cropped, sometimes a collimation border."""
    rows, cols = pixels.shape
    keep_r, keep_c = rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0)
    top = int(rng.uniform(0, 1 - keep_r) * rows)
    left = int(rng.uniform(0, 1 - keep_c) * cols)
    out = pixels[top:top + max(8, int(keep_r * rows)), left:left + max(8, int(keep_c * cols))]
    if rng.random() < 0.25:
        width = int(rng.uniform(0.02, 0.08) * max(out.shape))
        out = cv2.copyMakeBorder(out, width, width, width, width, cv2.BORDER_CONSTANT,
                                 value=float(rng.choice([0.0, 1.0])))
    return np.ascontiguousarray(out)


def _crop(pixels: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    rows, cols = pixels.shape
    side = rng.uniform(low, high)
    h, w = max(8, int(side * rows * rng.uniform(0.7, 1.3))), max(8, int(side * cols * rng.uniform(0.7, 1.3)))
    h, w = min(h, rows), min(w, cols)
    top, left = int(rng.integers(0, rows - h + 1)), int(rng.integers(0, cols - w + 1))
    return np.ascontiguousarray(pixels[top:top + h, left:left + w])


# --- hard but good chests: what the QA set's false alarms looked like ----------------------------
def white_out(pixels: np.ndarray, lung: np.ndarray, severity: float) -> np.ndarray:
    """Lungs pulled ``severity`` of the way towards the brightness of the image's brightest tenth, edges softened:
    severe ARDS / oedema on a supine ICU film."""
    if lung.shape != pixels.shape:
        lung = cv2.resize(lung.astype(np.uint8), (pixels.shape[1], pixels.shape[0]),
                          interpolation=cv2.INTER_NEAREST).astype(bool)
    target = float(np.quantile(pixels, 0.9))
    soft = cv2.GaussianBlur(lung.astype(np.float32), (0, 0), sigmaX=max(2.0, pixels.shape[1] / 80))
    return np.clip(pixels + severity * soft * (target - pixels).clip(min=0), 0.0, 1.0).astype(np.float32)


def small_patient(pixels: np.ndarray, rng: np.random.Generator, low: float = 0.55, high: float = 0.7) -> np.ndarray:
    """The film shrunk to ``low``-``high`` of its size at a random spot inside a dark border: a small child on a
    large cassette."""
    rows, cols = pixels.shape
    scale = float(rng.uniform(low, high))
    small = cv2.resize(pixels, (max(8, int(cols * scale)), max(8, int(rows * scale))), interpolation=cv2.INTER_AREA)
    canvas = np.full_like(pixels, float(np.quantile(pixels, 0.02)))
    top = int(rng.integers(0, rows - small.shape[0] + 1))
    left = int(rng.integers(0, cols - small.shape[1] + 1))
    canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    return canvas


def hard_chest(pixels: np.ndarray, lung: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One hard good chest for training: a white-out (severity 0.4-0.95) or a small patient (0.5-0.8 of the film)."""
    if rng.random() < 0.5:
        return white_out(pixels, lung, float(rng.uniform(0.4, 0.95)))
    return small_patient(pixels, rng, 0.5, 0.8)


def synthetic_image(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Something that is clearly not a radiograph: noise, gradients, shapes, stripes or a flat field."""
    kind = int(rng.integers(0, 5))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:
        image = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), rng.uniform(0.5, 12))
    elif kind == 1:
        angle = rng.uniform(0, np.pi)
        image = np.cos(angle) * xx + np.sin(angle) * yy
    elif kind == 2:
        image = np.full((size, size), rng.uniform(0, 1), np.float32)
        for _ in range(int(rng.integers(1, 8))):
            centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            axes = (int(rng.integers(5, size // 2)), int(rng.integers(5, size // 2)))
            cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0, 1)), -1)
    elif kind == 3:
        image = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 20) * (xx if rng.random() < 0.5 else yy))
    else:
        image = rng.normal(0.5, rng.uniform(0.001, 0.05), (size, size))
    return to_unit_range(np.asarray(image, np.float32) + rng.normal(0, 0.01, (size, size)).astype(np.float32))


@dataclass
class GateSamples:
    """Gate inputs (N, 1, GATE_SIZE, GATE_SIZE) float16, and per-sample labels.

    ``chest`` 1/0; ``negative`` 1/0 (meaningful for chests only); ``base_id`` the record or source.
    Orientation and mirror are applied at batch time (:func:`dihedral`).
    """

    x: np.ndarray
    chest: np.ndarray
    negative: np.ndarray
    base_id: list[str]


def _stack(items: list[tuple[np.ndarray, int, int, str]]) -> GateSamples:
    return GateSamples(
        x=np.stack([i[0] for i in items]).astype(np.float16),
        chest=np.array([i[1] for i in items], np.int64),
        negative=np.array([i[2] for i in items], np.int64),
        base_id=[i[3] for i in items],
    )


def build_samples(records: Sequence[Record], nonchest: Sequence[Path], *, variants: int = 2,
                  crops_per_record: int = 1, nonchest_variants: int = 40, synthetic: int = 300,
                  hard_variants: int = 1, seed: int = 0) -> GateSamples:
    """Render chest variants (positive and negative; ``hard_variants`` of them white-out or small-patient films,
    see :func:`hard_chest`), crops, real non-chest and synthetic images."""
    rng = np.random.default_rng(seed)
    items: list[tuple[np.ndarray, int, int, str]] = []
    for index, record in enumerate(records):
        pixels = read_image(record.image).pixels
        for _ in range(variants):
            image = _photometric(_frame(pixels, rng), rng)
            items.append((gate_input_from_pixels(image), 1, 0, record.id))
            items.append((gate_input_from_pixels(1.0 - image), 1, 1, record.id))
        if hard_variants:
            lung, _ = read_label_mask(record.mask)
            for _ in range(hard_variants):
                image = _photometric(hard_chest(pixels, lung, rng), rng)
                items.append((gate_input_from_pixels(image), 1, 0, record.id))
                items.append((gate_input_from_pixels(1.0 - image), 1, 1, record.id))
        for _ in range(crops_per_record):
            crop = _photometric(_crop(pixels, rng, 0.12, 0.4), rng)
            items.append((gate_input_from_pixels(crop if rng.random() < 0.5 else 1.0 - crop), 0, 0, record.id))
        if index % 100 == 0:
            log.info("gate samples: %d/%d radiographs", index, len(records))
    for path in nonchest:
        try:
            pixels = read_any_dicom(path)
        except Exception as exc:  # a test file this pydicom cannot decode: leave it out, say so
            log.warning("non-chest image %s left out: %s", path.name, exc)
            continue
        for _ in range(nonchest_variants):
            image = _photometric(_crop(pixels, rng, 0.5, 1.0), rng)
            image = np.rot90(image, int(rng.integers(0, 4)))
            items.append((gate_input_from_pixels(image if rng.random() < 0.5 else 1.0 - image), 0, 0, path.name))
    for i in range(synthetic):
        items.append((gate_input_from_pixels(synthetic_image(rng)), 0, 0, f"synthetic-{i}"))
    return _stack(items)
