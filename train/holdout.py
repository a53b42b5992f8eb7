"""Score a model bundle through ``lungseg-segment`` at native size on a held-out manifest subset.

This is the path a user gets (decode, preprocess, ONNX Runtime, postprocess, native-size
mask PNG), scored against the native-size reference masks with "ignore" pixels left out.
The default subset is the independent portable half of the data plan, which no model of
this project trains on.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from lungseg import metrics
from lungseg.data import Record, load_manifest, read_label_mask
from lungseg.segment import main as segment_main
from lungseg.train.config import TrainConfig
from lungseg.train.protocol import plan_data

log = logging.getLogger(__name__)


def holdout_records(manifest: Path, subset: str = "independent") -> list[Record]:
    """``independent``: the portable half never trained on; ``portable``: every portable image."""
    records = load_manifest(manifest)
    if subset == "portable":
        return [r for r in records if r.portable]
    if subset == "independent":
        return plan_data(records, TrainConfig()).independent
    raise ValueError(f"unknown subset {subset!r} (independent, portable)")


def dice(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> float:
    """Dice over the ``valid`` pixels only (the "ignore" label left out)."""
    return metrics.dice(pred & valid, truth & valid)


def score_bundle(model: Path | None, records: list[Record], extra_args: list[str] | None = None,
                 work: Path | None = None) -> dict[str, Any]:
    """Run ``lungseg-segment`` on ``records`` and score the masks; per-image rows plus means."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        out = Path(tmp)
        args = [str(r.image) for r in records] + ["--out", str(out), "--json-out", str(out / "lines.jsonl")]
        if model is not None:
            args += ["--model", str(model)]
        code = segment_main(args + (extra_args or []))
        rows = []
        for record in records:
            mask_path = out / f"{record.image.stem}_mask.png"
            truth, valid = read_label_mask(record.mask)
            if not mask_path.is_file():
                rows.append({"id": record.id, "portable": record.portable, "view": record.view, "dice": None})
                continue
            pred = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 127
            rows.append({"id": record.id, "portable": record.portable, "view": record.view,
                         "class": record.image_class, "dice": dice(pred, truth, valid)})
    scored = [r["dice"] for r in rows if r["dice"] is not None]
    portable = [r["dice"] for r in rows if r["dice"] is not None and r["portable"]]
    return {"segment_exit": code, "images": len(rows), "scored": len(scored),
            "mean_dice": float(np.mean(scored)) if scored else None,
            "min_dice": float(np.min(scored)) if scored else None,
            "mean_dice_portable": float(np.mean(portable)) if portable else None, "rows": rows}


def main_holdout(model: Path | None, manifest: Path, subset: str, out: Path | None,
                 extra_args: list[str] | None = None, path: str = "segment") -> dict[str, Any]:
    records = holdout_records(manifest, subset)
    result = score_edge(model, records, extra_args) if path == "edge" else score_bundle(model, records, extra_args)
    result["path"] = path
    result["subset"] = subset
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def radiograph_to_dicom(record: Record, path: Path, index: int) -> str:
    """Wrap a held-out 8-bit image as a minimal CR (MONOCHROME2, AP chest); returns its SOPInstanceUID."""
    pixels = cv2.imread(str(record.image), cv2.IMREAD_GRAYSCALE)
    if pixels is None:
        raise ValueError(f"{record.image}: not readable")
    uid = generate_uid(entropy_srcs=["lungseg-holdout", record.id])
    cr = "1.2.840.10008.5.1.4.1.1.1"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = cr
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = cr, uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["lungseg-holdout-study", record.id])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["lungseg-holdout-series", record.id])
    ds.Modality, ds.PatientName, ds.PatientID = "CR", "Holdout^Image", f"H{index:04d}"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240101", "120000", "", "1"
    ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "", "", "O"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CHEST", "AP", ["L", "F"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return uid


def score_edge(model: Path | None, records: list[Record], extra_args: list[str] | None = None) -> dict[str, Any]:
    """Wrap ``records`` as DICOM, run ``lungseg-edge run --once --seg`` and score each SEG at native size.

    The edge runs as its own process, exactly as a site runs it (training does not import the edge).
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        watch, out, state = root / "in", root / "out", root / "state"
        watch.mkdir()
        by_uid = {radiograph_to_dicom(r, watch / f"{i:04d}.dcm", i): r for i, r in enumerate(records)}
        args = [sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--once", "--watch", str(watch),
                "--out", str(out), "--state", str(state), "--seg"]
        if model is not None:
            args += ["--model", str(model)]
        code = subprocess.run(args + (extra_args or []), check=False).returncode
        masks: dict[str, np.ndarray] = {}
        for path in out.rglob("*.dcm"):
            ds = pydicom.dcmread(path)
            if ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.66.4":  # Segmentation Storage
                continue
            source = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
            masks[source] = np.asarray(ds.pixel_array).astype(bool).reshape(int(ds.Rows), int(ds.Columns))
    rows = []
    for uid, record in by_uid.items():
        truth, valid = read_label_mask(record.mask)
        value = dice(masks[uid], truth, valid) if uid in masks else None
        rows.append({"id": record.id, "portable": record.portable, "class": record.image_class, "dice": value})
    scored = [r["dice"] for r in rows if r["dice"] is not None]
    return {"edge_exit": code, "images": len(rows), "scored": len(scored),
            "mean_dice": float(np.mean(scored)) if scored else None,
            "min_dice": float(np.min(scored)) if scored else None, "rows": rows}
