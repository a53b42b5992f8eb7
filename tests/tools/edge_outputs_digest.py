"""Digest of lungseg-edge's outputs on a folder of DICOM files, UIDs and timestamps left out.

Run before and after a refactor: the two digests must be equal (``diff`` prints nothing).
usage: python tests/tools/edge_outputs_digest.py DICOM_DIR WORK_DIR > digest.json
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

VOLATILE_KEYWORDS = {  # UIDs made per run, times and the writing library's own version
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "MediaStorageSOPInstanceUID",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "SeriesDate",
    "SeriesTime",
    "FrameOfReferenceUID",
    "ReferencedSOPInstanceUID",
    "ReferencedSeriesInstanceUID",
    "DimensionOrganizationUID",
    "SeriesNumber",
    "InstanceNumber",
    "ContributionDateTime",
    "DateOfSecondaryCapture",
    "TimeOfSecondaryCapture",
    "ImplementationVersionName",
    "ImplementationClassUID",
    "UID",
    "DeviceUID",
}
VOLATILE_JSON = {
    "file",
    "file_ref",
    "timings_ms",
    "processed_at",
    "timestamp",
    "created",
    "elapsed_ms",
    "time",
    "uids",
    "outputs",
}


def dataset_digest(ds: pydicom.Dataset) -> dict:
    out = {}
    for elem in ds.iterall():
        if elem.keyword in VOLATILE_KEYWORDS or (elem.VR == "UI" and elem.keyword.endswith("InstanceUID")):
            continue
        if elem.VR == "SQ":
            continue
        if elem.keyword in ("PixelData",):
            continue
        out[elem.keyword or str(elem.tag)] = str(elem.value)[:200]
    if "PixelData" in ds:
        out["pixels_sha256"] = hashlib.sha256(ds.pixel_array.tobytes()).hexdigest()
        out["transfer_syntax"] = str(ds.file_meta.TransferSyntaxUID)
    return out


def strip_json(obj):
    if isinstance(obj, dict):
        return {
            k: strip_json(v)
            for k, v in obj.items()
            if k not in VOLATILE_JSON and "uid" not in k.lower() and not k.endswith("_ms") and not k.endswith("_at")
        }
    if isinstance(obj, list):
        return [strip_json(v) for v in obj]
    return obj


def main() -> int:
    src, work = Path(sys.argv[1]), Path(sys.argv[2])
    shutil.rmtree(work, ignore_errors=True)
    watch = work / "in"
    watch.mkdir(parents=True)
    for f in sorted(src.glob("*.dcm")):
        shutil.copy(f, watch / f.name)
    cmd = [
        "lungseg-edge",
        "run",
        "--once",
        "--watch",
        str(watch),
        "--out",
        str(work / "out"),
        "--state",
        str(work / "state"),
        "--backend",
        "cpu",
        "--seg",
    ]
    rc = subprocess.run(cmd, capture_output=True, text=True).returncode
    result: dict = {"exit_code": rc, "files": {}}
    for f in sorted((work / "out").rglob("*")):
        if not f.is_file() or "quarantine" in f.parts:
            continue
        key = str(f.relative_to(work / "out"))  # named by the source's UIDs, which do not change
        if f.suffix == ".dcm":
            result["files"][key] = dataset_digest(pydicom.dcmread(f))
        elif f.suffix == ".json":
            result["files"][key] = strip_json(json.loads(f.read_text()))
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
