"""End to end: a burst of DICOM files through ``lungseg-edge run --once``.

The burst is ``n`` copies of real DICOM radiographs, each with a fresh
SOPInstanceUID (the edge runtime skips content and instances it has seen). They
are written to a staging folder, then renamed into the watch folder one after the
other; the time of each rename is the file's arrival. After the run, each
input's overlay Secondary Capture ``<out>/<study>/<SOPInstanceUID>.sc.dcm`` is
matched by UID: latency = SC mtime - arrival (this includes the service's start-up,
model load and file-stability wait, as a real burst would see). Throughput =
n / wall time of the whole run. The sidecars' own per-stage timings are
summarised beside.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lungseg.export.timing import summary_ms

log = logging.getLogger(__name__)

EDGE_MODULE = "lungseg.edge_runtime.cli"
TIMEOUT_S = 600


def edge_command() -> list[str] | None:
    """How to start ``lungseg-edge`` with this interpreter, or ``None`` when it is not installed."""
    if importlib.util.find_spec(EDGE_MODULE) is None:
        return None
    script = Path(sys.executable).with_name("lungseg-edge")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from {EDGE_MODULE} import main; sys.exit(main())"]


def make_burst(sources: Sequence[Path], n: int, staging: Path) -> dict[str, Path]:
    """``n`` copies of ``sources`` (cycled) with fresh SOPInstanceUIDs; returns {uid: staged file}."""
    import pydicom
    from pydicom.uid import generate_uid

    staging.mkdir(parents=True, exist_ok=True)
    burst = {}
    for index in range(n):
        source = sources[index % len(sources)]
        dataset = pydicom.dcmread(source, force=True)
        uid = generate_uid()
        dataset.SOPInstanceUID = uid
        if "MediaStorageSOPInstanceUID" in getattr(dataset, "file_meta", {}):
            dataset.file_meta.MediaStorageSOPInstanceUID = uid
        target = staging / f"burst-{index:03d}-{source.stem}.dcm"
        dataset.save_as(target, enforce_file_format=False)
        burst[uid] = target
    return burst


def run_burst(sources: Sequence[Path], n: int, bundle: Path, work: Path, *, backend: str = "cpu",
              threads: int | None = None) -> dict[str, Any]:
    """Run the burst; returns throughput, arrival->SC latency and the edge's own timings."""
    command = edge_command()
    if command is None:
        return {"skipped": f"{EDGE_MODULE} is not installed"}
    if not sources:
        return {"skipped": "no DICOM files for the burst (pass --data DICOM_DIR)"}
    watch, out, state = work / "watch", work / "out", work / "state"
    for folder in (watch, out, state):
        folder.mkdir(parents=True, exist_ok=True)
    burst = make_burst(sources, n, work / "staging")
    args = [*command, "run", "--watch", str(watch), "--out", str(out), "--state", str(state), "--once",
            "--model", str(bundle), "--backend", backend]
    if threads:
        args += ["--threads", str(threads)]
    arrival = {}
    start = time.time()
    for uid, staged in burst.items():
        os.replace(staged, watch / staged.name)
        arrival[uid] = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    wall = time.time() - start
    latencies, sidecar_totals, missing = [], [], []
    for uid, arrived in arrival.items():
        sc = next(out.glob(f"*/{uid}.sc.dcm"), None)
        if sc is None:
            missing.append(uid)
            continue
        latencies.append((sc.stat().st_mtime - arrived) * 1000)
        sidecar = sc.with_name(f"{uid}.json")
        if sidecar.is_file():
            sidecar_totals.append(json.loads(sidecar.read_text()).get("timings_ms", {}).get("total", 0.0))
    result: dict[str, Any] = {
        "command": " ".join(["lungseg-edge", *args[len(command):]]).replace(str(work), "<tmp>"),
        "exit_code": proc.returncode,
        "files": n,
        "sources": sorted({s.name for s in sources}),
        "written": len(latencies),
        "missing": len(missing),
        "wall_s": wall,
        "files_per_s": len(latencies) / wall if wall > 0 else None,
        "arrival_to_sc": summary_ms(latencies),
        "sidecar_total": summary_ms(sidecar_totals),
    }
    if proc.returncode != 0 or missing:
        result["stderr_tail"] = proc.stderr[-2000:]
    return result
