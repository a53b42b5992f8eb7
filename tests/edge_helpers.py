"""Helpers shared by the edge runtime tests: small synthetic CR files, real data, dciodvfy."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DICOM = REPO_ROOT.parent / "shared" / "data" / "dicom"
FIXTURE_IMAGES = REPO_ROOT / "tests" / "fixtures" / "cxr" / "images"
SHARED_FILES = (
    "cr_chest_mono1_uncompressed.dcm",
    "cr_chest_mono1_j2k_lossy.dcm",
    "cr_chest_mono1_jpegls_near_lossless.dcm",
    "cr_chest_mono1_no_file_meta.dcm",
    "dx_chest_mono1_j2k_lossless.dcm",
    "dx_chest_mono2_rotated_j2k_lossless.dcm",
)
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1.1"
STUDY_UID = "1.2.826.0.1.3680043.10.1082.1"
SERIES_UID = "1.2.826.0.1.3680043.10.1082.1.1"


def shared_dicom_dir() -> Path:
    """The six real chest radiograph DICOMs beside the project (skips the test where absent)."""
    if not all((SHARED_DICOM / name).is_file() for name in SHARED_FILES):
        pytest.skip(f"real DICOM files not present at ../shared/data/dicom (looked in {SHARED_DICOM})")
    return SHARED_DICOM


def dciodvfy_errors(path: Path) -> list[str]:
    """``dciodvfy``'s "Error" lines for a file (warnings are allowed); skips without dicom3tools."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, errors="replace", timeout=60,
                            check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def fixture_pixels(index: int = 0, size: int = 128) -> np.ndarray:
    """A real chest radiograph from the committed fixtures, ``size x size``, 12-bit."""
    import cv2

    images = sorted(FIXTURE_IMAGES.glob("*.png"))
    image = cv2.imread(str(images[index % len(images)]), cv2.IMREAD_GRAYSCALE)
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return (image.astype(np.uint16) * 16).astype(np.uint16)


def make_cr(
    sop_uid: str,
    *,
    index: int = 0,
    size: int = 128,
    study_uid: str = STUDY_UID,
    series_uid: str = SERIES_UID,
    pixel_spacing: tuple[float, float] | None = None,
    imager_spacing: tuple[float, float] | None = None,
    magnification: float | None = None,
    photometric: str = "MONOCHROME2",
):
    """A small, valid CR PA chest data set (Explicit VR Little Endian) with file meta."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    pixels = fixture_pixels(index, size)
    if photometric == "MONOCHROME1":
        pixels = (4095 - pixels).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CR"
    ds.PatientName = "Synthetic^Test"
    ds.PatientID = "SYN-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Manufacturer = "lungseg-tests"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:g}" for v in imager_spacing]
    if magnification is not None:
        ds.EstimatedRadiographicMagnificationFactor = f"{magnification:g}"
    ds.PixelData = pixels.tobytes()
    return ds


def associate(port: int, calling: str = "PORTABLE1", called: str = "LUNGSEG", classes=(), *,
              timeout: float = 10.0, bind_port: int = 0):
    """A pynetdicom association to the receiver on 127.0.0.1 (from 127.0.0.1, ``bind_port``: 0 any), proposing
    ``classes`` in Explicit then Implicit VR Little Endian."""
    import pynetdicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ae = pynetdicom.AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in classes:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=("127.0.0.1", bind_port))


def store_all(port: int, datasets, calling: str = "PORTABLE1") -> list[int]:
    """C-STORE every data set on one association; their statuses."""
    assoc = associate(port, calling, classes=sorted({str(ds.SOPClassUID) for ds in datasets}))
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def save(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_bytes(ds) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_in_two_halves(path: Path, data: bytes, pause: float) -> threading.Thread:
    """Write half, pause (file open), write the rest: a slow sender (in a thread)."""

    def writer() -> None:
        with path.open("wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            threading.Event().wait(pause)
            fh.write(data[len(data) // 2:])

    thread = threading.Thread(target=writer)
    thread.start()
    return thread


def sc_files(out: Path) -> list[Path]:
    return sorted(out.glob("*/*.sc.dcm"))


def sidecars(out: Path) -> list[dict]:
    """The JSON sidecars (study folders only: not the state or quarantine folders)."""
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/*.json"))
            if not p.parent.name.startswith(".") and p.parent.name != "quarantine"]


def run_once(watch: Path, out: Path, model: Path, **settings) -> int:
    """``lungseg-edge run --once`` in this process (the same code path as the daemon).

    Inputs written by a test are complete, so they are quarantined at once (no grace period)."""
    from lungseg.edge_runtime.config import EdgeConfig
    from lungseg.edge_runtime.daemon import run

    settings.setdefault("quarantine_grace_seconds", 0.0)
    config = EdgeConfig(watch=watch, out=out, model=model, backend="cpu", once=True, stable_seconds=0.0,
                        settle_seconds=0.0, **settings).validate()
    return run(config)


def file_ref(state: Path, watch: Path, name: str) -> str:
    """The reference logs, sidecars and quarantine names use for ``watch/name`` (names are not revealed)."""
    from lungseg.edge_runtime.names import FileNamer

    watch = Path(watch).resolve()
    return FileNamer(state, watch).ref(watch / name)
