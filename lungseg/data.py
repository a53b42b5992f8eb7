"""The dataset manifest, label masks and patient-disjoint splits."""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

LUNG_VALUE = 255
IGNORE_VALUE = 127
REQUIRED_COLUMNS = ("id", "image", "mask", "patient_id", "class", "portable")


@dataclass(frozen=True)
class Record:
    """One manifest row; paths are absolute."""

    id: str
    image: Path
    mask: Path
    patient_id: str
    image_class: str
    portable: bool
    view: str = ""
    pairing: str = ""
    license: str = ""


def load_manifest(path: str | Path) -> list[Record]:
    """Read a manifest CSV (columns as in the lungseg data README); paths resolve beside it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    root = path.parent
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: manifest lacks columns {missing}")
        return [
            Record(
                id=row["id"],
                image=root / row["image"],
                mask=root / row["mask"],
                patient_id=row["patient_id"],
                image_class=row["class"],
                portable=row["portable"].strip().lower() == "true",
                view=row.get("view", ""),
                pairing=row.get("pairing", ""),
                license=row.get("license", ""),
            )
            for row in reader
        ]


def read_label_mask(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a mask PNG -> (lung: bool, valid: bool); ``valid`` is False on the "ignore" label."""
    raw = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if raw is None:
        raise ValueError(f"{path}: not a readable mask PNG")
    ignore = np.abs(raw.astype(np.int16) - IGNORE_VALUE) < 64
    lung = raw >= 192
    return lung, ~ignore


def split_by_patient(
    records: Sequence[Record],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> list[list[Record]]:
    """Deterministic patient-disjoint split into ``len(fractions)`` parts.

    Patients are shuffled with ``seed`` and assigned greedily to the part whose
    image count lags its target most, so parts match the fractions in images.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions {fractions} do not sum to 1")
    by_patient: dict[str, list[Record]] = {}
    for record in records:
        by_patient.setdefault(record.patient_id, []).append(record)
    patients = sorted(by_patient)
    random.Random(seed).shuffle(patients)
    total = len(records)
    parts: list[list[Record]] = [[] for _ in fractions]
    for patient in patients:
        deficits = [fractions[i] * total - len(parts[i]) for i in range(len(parts))]
        parts[int(np.argmax(deficits))].extend(by_patient[patient])
    return [sorted(part, key=lambda r: r.id) for part in parts]
