"""End to end: DICOM files through ``lungseg-edge run --once``, timed from outside and from its own log.

A run is ``n`` copies of real DICOM radiographs, each with a fresh SOPInstanceUID (the
edge runtime skips content and instances it has seen). They are written to a staging
folder, then renamed into the watch folder one after the other; the time of each rename
is the file's arrival. The daemon runs with ``--log-json --log-uids`` (the UIDs are the
benchmark's own); its ``processed`` lines, matched to the inputs by SOPInstanceUID, give
each file's stages (``decode``, ``preprocess``, ``infer``, ``postprocess``, ``write``
including publish and ledger commit, and the parts of ``write``). Its peak resident
memory (and that of its decode worker) is sampled from ``/proc`` while it runs.
Throughput = files written / wall time of the whole run (start-up included, as a real
burst would see it); latency = SC mtime - arrival.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from lungseg.atomic import fsync_file
from lungseg.export.timing import summary_ms

log = logging.getLogger(__name__)

EDGE_MODULE = "lungseg.edge_runtime.cli"
TIMEOUT_S = 900


def edge_command() -> list[str] | None:
    """How to start ``lungseg-edge`` with this interpreter, or ``None`` when it is not installed."""
    if importlib.util.find_spec(EDGE_MODULE) is None:
        return None
    script = Path(sys.executable).with_name("lungseg-edge")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from {EDGE_MODULE} import main; sys.exit(main())"]


def make_burst(sources: Sequence[Path], n: int, staging: Path, interleave: bool = True) -> dict[str, Path]:
    """``n`` copies of ``sources`` (cycled) with fresh SOPInstanceUIDs; returns {uid: staged file}."""
    staging.mkdir(parents=True, exist_ok=True)
    burst = {}
    datasets = [pydicom.dcmread(source, force=True) for source in sources]
    for index in range(n):
        which = index % len(sources) if interleave else index * len(sources) // n
        source, dataset = sources[which], datasets[which]
        uid = generate_uid()
        dataset.SOPInstanceUID = uid
        if "MediaStorageSOPInstanceUID" in getattr(dataset, "file_meta", {}):
            dataset.file_meta.MediaStorageSOPInstanceUID = uid
        target = staging / f"burst-{index:03d}-{source.stem}.dcm"
        dataset.save_as(target, enforce_file_format=False)
        burst[uid] = target
    for target in burst.values():  # on disk before the run: its fsyncs must not flush the benchmark's own writes
        fsync_file(target)
    return burst


def _vm_hwm_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError, ValueError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


class PeakMemory:
    """Samples the peak RSS (VmHWM) of a process and of its children until stopped."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.main: float | None = None
        self.children: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = _vm_hwm_mib(self.pid)
            if value is not None:
                self.main = max(self.main or 0.0, value)
            for child in _children(self.pid):
                value = _vm_hwm_mib(child)
                if value is not None:
                    self.children[child] = max(self.children.get(child, 0.0), value)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _processed_lines(stderr: str) -> list[dict[str, Any]]:
    lines = []
    for line in stderr.splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "processed":
                lines.append(record)
    return lines


def run_edge(sources: Sequence[Path], n: int, bundle: Path, work: Path, *, backend: str = "cpu",
             threads: int | None = None, extra_args: Sequence[str] = (), interleave: bool = True) -> dict[str, Any]:
    """Run ``n`` copies of ``sources`` through one ``lungseg-edge run --once``; per-file records and totals."""
    command = edge_command()
    if command is None:
        return {"skipped": f"{EDGE_MODULE} is not installed"}
    if not sources:
        return {"skipped": "no DICOM files (pass --dicom DIR)"}
    watch, out, state = work / "watch", work / "out", work / "state"
    for folder in (watch, out, state):
        folder.mkdir(parents=True, exist_ok=True)
    burst = make_burst(sources, n, work / "staging", interleave=interleave)
    args = [*command, "run", "--watch", str(watch), "--out", str(out), "--state", str(state), "--once",
            "--model", str(bundle), "--backend", backend, "--log-json", "--log-uids", *extra_args]
    if threads:
        args += ["--threads", str(threads)]
    arrival = {}
    start = time.time()
    for uid, staged in burst.items():
        os.replace(staged, watch / staged.name)
        arrival[uid] = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as memory:
        try:
            _, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    wall = time.time() - start
    latencies, missing, sidecars = [], [], []
    for uid, arrived in arrival.items():
        sc = next(out.glob(f"*/{uid}.sc.dcm"), None)
        if sc is None:
            missing.append(uid)
            continue
        latencies.append((sc.stat().st_mtime - arrived) * 1000)
        sidecar = sc.with_name(f"{uid}.json")
        if sidecar.is_file():
            sidecars.append(json.loads(sidecar.read_text()))
    files = _processed_lines(stderr)
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
        "sidecar_total": summary_ms([s.get("timings_ms", {}).get("total", 0.0) for s in sidecars]),
        "peak_rss_mib": memory.main,
        "worker_peak_rss_mib": max(memory.children.values()) if memory.children else None,
        "backend": sorted({f"{s.get('backend')} {s.get('precision')}" for s in sidecars}),
        "per_file": [{"file": burst[f["sop"]].name if f.get("sop") in burst else None, "time": f.get("time"),
                      "timings_ms": f.get("timings_ms", {}), "write_stages_ms": f.get("write_stages_ms", {})}
                     for f in files],
    }
    if proc.returncode != 0 or missing:
        result["stderr_tail"] = stderr[-2000:]
    return result


def run_burst(sources: Sequence[Path], n: int, bundle: Path, work: Path, *, backend: str = "cpu",
              threads: int | None = None, extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """A burst: throughput, arrival->SC latency, peak RSS and the edge's own timings (no per-file list)."""
    result = run_edge(sources, n, bundle, work, backend=backend, threads=threads, extra_args=extra_args)
    result.pop("per_file", None)
    return result
