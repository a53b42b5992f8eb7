"""DICOM radiographs for the benchmark: real ones when present, generated from real images otherwise.

Generated files carry real chest radiograph pixels (the benchmark's images, resampled to
the size wanted, stored as 12-bit MONOCHROME1 like a CR/DX detector writes them) in
the encodings the edge sees: uncompressed Explicit VR Little Endian and JPEG 2000 Lossless.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

log = logging.getLogger(__name__)

# (name, rows, columns, encoding, modality): the shapes of the project's real test files
GENERATED = (
    ("gen_dx_j2k_lossless_2128x2000.dcm", 2128, 2000, "j2k", "DX"),
    ("gen_cr_uncompressed_1955x1841.dcm", 1955, 1841, "explicit", "CR"),
    ("gen_cr_uncompressed_440x440.dcm", 440, 440, "explicit", "CR"),
)
BIG_J2K = "dx_chest_mono1_j2k_lossless.dcm"
BIG_UNCOMPRESSED = "cr_chest_mono1_uncompressed.dcm"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def synthetic_dicom(pixels: np.ndarray, path: Path, *, rows: int, columns: int, encoding: str = "explicit",
                    modality: str = "CR", spacing_mm: float = 0.16) -> Path:
    """Write ``pixels`` (float [0, 1], MONOCHROME2) as a ``rows x columns`` 12-bit MONOCHROME1 radiograph."""
    interpolation = cv2.INTER_AREA if rows * columns < pixels.size else cv2.INTER_CUBIC
    resized = cv2.resize(np.asarray(pixels, dtype=np.float32), (columns, rows), interpolation=interpolation)
    stored = (4095 - np.clip(resized, 0.0, 1.0) * 4095 + 0.5).astype(np.uint16)  # MONOCHROME1: dense = dark
    sop_class = DX_STORAGE if modality == "DX" else CR_STORAGE
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientBirthDate = "Benchmark^Generated", "BENCH", "O", ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = (
        "20240101", "120000", "", "1", "")
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer = "lungseg-bench"
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CHEST", "PA", ["L", "F"]
    if modality == "DX":
        ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
        ds.PresentationLUTShape = "INVERSE"
    ds.ImagerPixelSpacing = [f"{spacing_mm:g}", f"{spacing_mm:g}"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ds.PixelData = stored.tobytes()
    if encoding == "j2k":
        ds.compress(JPEG2000Lossless, stored)
    elif encoding != "explicit":
        raise ValueError(f"unknown encoding {encoding!r}")
    ds.save_as(path, enforce_file_format=True)
    return path


def generated_set(images: Sequence[np.ndarray], folder: Path) -> list[Path]:
    """Files shaped like the project's real set (:data:`GENERATED`), from the first images."""
    folder.mkdir(parents=True, exist_ok=True)
    return [synthetic_dicom(images[i % len(images)], folder / name, rows=rows, columns=columns, encoding=encoding,
                            modality=modality)
            for i, (name, rows, columns, encoding, modality) in enumerate(GENERATED)]


def small_set(images: Sequence[np.ndarray], folder: Path, count: int = 8, side: int = 512) -> list[Path]:
    """``count`` distinct small uncompressed radiographs (``side`` px long side), for bursts."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        image = images[i % len(images)]
        scale = side / max(image.shape)
        rows, columns = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
        files.append(synthetic_dicom(image, folder / f"small_{i:02d}.dcm", rows=rows, columns=columns))
    return files


def pick(files: Sequence[Path], real_name: str, generated_name: str) -> Path | None:
    """The real file by name, else the generated stand-in, else ``None``."""
    by_name = {f.name: f for f in files}
    return by_name.get(real_name) or by_name.get(generated_name)
