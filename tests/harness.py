"""The project's own robustness harness for ``lungseg-edge``: a mutation fuzzer and a kill -9 soak.

A test tool, not part of the package (it reads ``tests/fixtures``): ``make fuzz`` and ``make soak`` run it
at full size, ``tests/test_fuzz.py`` and ``tests/test_soak.py`` (the ``robustness`` tier) briefly.

``python tests/harness.py fuzz --inputs 2000 --memory-limit 1500000000``
    writes valid chest radiographs (made from the committed fixture images, in four
    transfer syntaxes, plus pydicom's own test files relabelled as CR) and thousands of
    mutations of them -- truncations, byte flips, garbled VRs, huge Rows/Columns/frames
    and lengths, lying JPEG 2000 size markers, junk RLE segments, splices, junk -- into
    a watch folder, runs ``lungseg-edge run --once`` on it under an address-space limit,
    then runs it again. It checks: no crash (exit 0/1), no hang (time limit), no OOM
    kill, every input accounted for in the ledger (processed, duplicate or quarantined
    with a reason file), every valid input processed, and no poison loop (the second
    run decides nothing anew).

``python tests/harness.py soak --files 300 --kills 15``
    runs the daemon while a sender drops files (some renamed from ``.part``, some
    written in two halves), SIGKILLs it at random moments and restarts it, then checks:
    0 lost, 0 duplicated, 0 partial outputs, ledger consistent, every SC readable (and
    ``dciodvfy``-clean where dicom3tools is installed).

``python tests/harness.py isolation FILE... --repeat 5``
    measures what the decode worker costs per file: the same files decoded in this
    process and through the worker (send, decode, pickle the radiograph back).

All print one summary line (``--json`` for a JSON object); fuzz and soak exit 0 only
when every check holds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]  # this file is tests/harness.py
FIXTURE_IMAGES = REPO_ROOT / "tests" / "fixtures" / "cxr" / "images"
UID_ROOT = "1.2.826.0.1.3680043.10.1082.9"
PYDICOM_SEEDS = ("MR_small_RLE.dcm", "JPEG2000.dcm", "JPEGLSNearLossless_16.dcm", "CT_small.dcm", "RG1_UNCR.dcm",
                 "emri_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_rle.dcm")


# --- seeds -----------------------------------------------------------------------------------------------
def fixture_pixels(count: int, size: int) -> list[Any]:
    """Real radiographs from the committed fixtures (12-bit, ``size`` square); a gradient when absent."""
    import cv2
    import numpy as np

    images = sorted(FIXTURE_IMAGES.glob("*.png"))
    out = []
    for index in range(count):
        if images:
            image = cv2.imread(str(images[index % len(images)]), cv2.IMREAD_GRAYSCALE)
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        else:
            image = np.add.outer(np.arange(size), np.arange(size)).astype(np.uint8)
        out.append((image.astype(np.uint16) * 16).astype(np.uint16))
    return out


def synthetic_cr(sop_uid: str, pixels: Any, syntax: str = "explicit") -> bytes:
    """A valid CR PA chest data set with file meta, encoded in ``syntax`` (explicit, rle, j2k, jpegls)."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLSLossless,
        RLELossless,
    )

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = sop_uid + ".1"
    ds.SeriesInstanceUID = sop_uid + ".2"
    ds.Modality = "CR"
    ds.PatientName = "Fuzz^Harness"
    ds.PatientID = "FUZZ-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240101", "120000", "FZ1", "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BodyPartExamined, ds.ViewPosition, ds.PatientOrientation = "CHEST", "PA", ["L", "F"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.PixelData = pixels.tobytes()
    encoder = {"rle": RLELossless, "j2k": JPEG2000Lossless, "jpegls": JPEGLSLossless}.get(syntax)
    if encoder is not None:
        ds.compress(encoder)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def relabelled_pydicom_seeds() -> list[bytes]:
    """pydicom's own test files (other codecs, other layouts) relabelled as CR so they reach the decoders."""
    import pydicom
    from pydicom.data import get_testdata_file

    seeds = []
    for name in PYDICOM_SEEDS:
        path = None
        with contextlib.suppress(Exception):
            path = get_testdata_file(name, download=False)
        if not path:
            continue
        raw = Path(path).read_bytes()
        seeds.append(raw)
        with contextlib.suppress(Exception):
            ds = pydicom.dcmread(io.BytesIO(raw))
            ds.Modality, ds.ViewPosition = "CR", "PA"
            buffer = io.BytesIO()
            ds.save_as(buffer)
            seeds.append(buffer.getvalue())
    return seeds


# --- mutations -------------------------------------------------------------------------------------------
def _find_element(data: bytes, group: int, element: int) -> int:
    return data.find(struct.pack("<HH", group, element))


def mutate(seed: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of ``seed``: ``(kind, bytes)``."""
    data = bytearray(seed)
    kind = rng.choice(("truncate", "flip", "flip_header", "vr", "huge_dims", "huge_frames", "huge_length", "j2k_siz",
                       "rle_junk", "splice", "junk", "zero_run", "dup_header"))
    if kind == "truncate":
        return kind, bytes(data[:rng.randrange(0, max(1, len(data)))])
    if kind in ("flip", "flip_header"):
        span = min(len(data), 2048) if kind == "flip_header" else len(data)
        for _ in range(rng.randint(1, 24)):
            if span:
                data[rng.randrange(span)] = rng.randrange(256)
        return kind, bytes(data)
    if kind == "vr":
        positions = [i for i in range(132, min(len(data) - 2, 4096)) if data[i:i + 2].isalpha() and data[i:i + 2]
                     .isupper()]
        for at in rng.sample(positions, min(len(positions), rng.randint(1, 3))):
            data[at:at + 2] = rng.choice((b"ZZ", b"\x00\x00", b"QQ", b"SQ", b"UN", b"OB", bytes(rng.randbytes(2))))
        return kind, bytes(data)
    if kind == "huge_dims":
        for tag in ((0x0028, 0x0010), (0x0028, 0x0011)):
            at = _find_element(data, *tag)
            if at >= 0:
                data[at + 8:at + 10] = struct.pack("<H", rng.choice((65535, 40000, 0, 1)))
        return kind, bytes(data)
    if kind == "huge_frames":
        at = _find_element(data, 0x0028, 0x0010)
        frames = str(rng.choice((100000, 2**31 - 1, 5000))).encode()
        frames += b" " * (len(frames) % 2)
        element = struct.pack("<HH", 0x0028, 0x0008) + b"IS" + struct.pack("<H", len(frames)) + frames
        if at >= 0:
            data[at:at] = element
        return kind, bytes(data)
    if kind == "huge_length":
        at = rng.randrange(132, max(133, min(len(data) - 8, 3000)))
        data[at:at + 4] = struct.pack("<I", rng.choice((0xFFFFFFF0, 0x7FFFFFFF, 0x10000000, 0xFFFFFFFF)))
        return kind, bytes(data)
    if kind == "j2k_siz":
        at = data.find(b"\xff\x4f\xff\x51")
        if at >= 0:
            size = rng.choice((60000, 65535, 4096, 1))
            data[at + 8:at + 16] = struct.pack(">2I", size, size)
        return kind, bytes(data)
    if kind == "rle_junk":
        at = data.find(b"\xfe\xff\x00\xe0", _find_element(data, 0x7FE0, 0x0010) + 1)
        at = data.find(b"\xfe\xff\x00\xe0", at + 8) if at >= 0 else -1
        if at >= 0:
            start = at + 8
            if rng.random() < 0.5:
                n1 = rng.randint(1, 80)
                header = struct.pack("<16I", 2, 64, 64 + 2 * n1, *([0] * 13))
                junk = header + b"\x81\x10" * n1 + b"\x81\x20" * rng.randint(1, 80)
            else:
                junk = bytes(rng.randbytes(rng.randint(16, 4096)))
            end = min(len(data), start + len(junk))
            data[start:end] = junk[:end - start]
        return kind, bytes(data)
    if kind == "splice":
        cut = rng.randrange(max(1, len(data)))
        return kind, bytes(data[:cut] + data[rng.randrange(max(1, len(data))):])
    if kind == "zero_run":
        at = rng.randrange(max(1, len(data)))
        data[at:at + rng.randint(1, 4096)] = b"\x00" * rng.randint(1, 4096)
        return kind, bytes(data)
    if kind == "dup_header":
        return kind, bytes(data[:rng.randrange(132, max(133, min(len(data), 2000)))]) + bytes(data)
    return "junk", b"\x00" * 128 + b"DICM" + bytes(rng.randbytes(rng.randint(0, 8192)))


# --- running the daemon ------------------------------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lungseg.edge_runtime.cli", *args]


def _limit(memory_limit: int | None):
    if not memory_limit:
        return None

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return apply


def _write_config(path: Path, **settings: Any) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _ledger_rows(state: Path) -> list[tuple[str, str, str | None]]:
    db = sqlite3.connect(f"{(state / 'ledger.sqlite3').resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT sha256, status, code FROM files").fetchall()
    finally:
        db.close()


@dataclass
class FuzzReport:
    inputs: int = 0
    valid: int = 0
    valid_processed: int = 0
    processed: int = 0
    duplicates: int = 0
    quarantined: int = 0
    crashes: int = 0
    undone_runs: int = 0
    hangs: int = 0
    oom_kills: int = 0
    poison_loops: int = 0
    unaccounted: int = 0
    exit_codes: list[int] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.crashes == self.hangs == self.oom_kills == self.poison_loops == self.unaccounted == 0
                and self.undone_runs == 0
                and self.valid_processed == self.valid)

    def line(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in sorted(self.codes.items(), key=lambda kv: -kv[1])[:8])
        return (f"fuzz {'PASS' if self.ok else 'FAIL'}: {self.inputs} inputs ({self.valid} valid, "
                f"{self.valid_processed} of them processed); {self.processed} processed, {self.duplicates} "
                f"duplicates, {self.quarantined} quarantined [{top}]; crashes {self.crashes}, runs leaving work "
                f"undone {self.undone_runs}, hangs {self.hangs}, "
                f"OOM kills {self.oom_kills}, poison loops {self.poison_loops}, unaccounted {self.unaccounted}; "
                f"exit codes {self.exit_codes}; peak RSS {self.peak_rss_mb:.0f} MB; {self.wall_seconds:.0f} s")


def run_fuzz(inputs: int, workdir: Path, model: Path, *, seed: int = 0, size: int = 96, valid: int | None = None,
             memory_limit: int | None = None, batch_size: int = 4, seconds_per_input: float = 3.0) -> FuzzReport:
    """Generate ``inputs`` mutated files (+ valid ones), run ``--once`` twice, check every guarantee."""
    import resource

    rng = random.Random(seed)
    watch, out, state = workdir / "watch", workdir / "out", workdir / "state"
    watch.mkdir(parents=True)
    valid = valid if valid is not None else max(4, inputs // 20)
    report = FuzzReport()
    valid_shas = set()
    pixels = fixture_pixels(8, size)
    seeds = [synthetic_cr(f"{UID_ROOT}.{seed}.0.{i}", pixels[i % len(pixels)], syntax)
             for i, syntax in enumerate(("explicit", "rle", "j2k", "jpegls"))]
    seeds += relabelled_pydicom_seeds()
    for i in range(valid):
        data = synthetic_cr(f"{UID_ROOT}.{seed}.1.{i}", pixels[i % len(pixels)], ("explicit", "rle", "j2k")[i % 3])
        (watch / f"valid{i:05d}.dcm").write_bytes(data)
        valid_shas.add(hashlib.sha256(data).hexdigest())
    all_shas = set(valid_shas)
    for i in range(inputs):
        kind, data = mutate(rng.choice(seeds), rng)
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
        (watch / f"m{i:05d}-{kind}").write_bytes(data)
        all_shas.add(hashlib.sha256(data).hexdigest())
    report.inputs, report.valid = inputs + valid, valid
    config = _write_config(workdir / "fuzz.toml", quarantine_grace_seconds=0, stable_seconds=0, settle_seconds=0,
                           batch_size=batch_size, log_json=True, decode_timeout_seconds=20)
    command = _cli("run", "--once", "--config", str(config), "--watch", str(watch), "--out", str(out), "--state",
                   str(state), "--model", str(model), "--backend", "cpu")
    limit = 120 + seconds_per_input * report.inputs
    t0 = time.monotonic()
    for attempt in range(2):  # the second run must decide nothing anew (no poison loop, no retry loop)
        before = _ledger_rows(state) if attempt else []
        log = (workdir / f"run{attempt}.log").open("w")
        try:
            proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=log, timeout=limit, check=False,
                                  preexec_fn=_limit(memory_limit))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            report.hangs += 1
            code = -1
        finally:
            log.close()
        report.exit_codes.append(code)
        if code == -signal.SIGKILL:
            report.oom_kills += 1
        elif code == 6:  # EXIT_UNDONE: a transient fault (memory, disk) outlasted --once's retries
            report.undone_runs += 1
        elif code not in (0, 1, -1):
            report.crashes += 1
        if attempt and sorted(_ledger_rows(state)) != sorted(before):
            report.poison_loops += 1
    report.wall_seconds = time.monotonic() - t0
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rows = _ledger_rows(state)
    status: dict[str, set[str]] = {}
    for sha, state_name, code in rows:
        status.setdefault(sha, set()).add(state_name)
        if state_name == "quarantined":
            report.codes[code] = report.codes.get(code, 0) + 1
    report.processed = sum(1 for _, s, _ in rows if s == "done")
    report.duplicates = sum(1 for _, s, _ in rows if s == "duplicate")
    report.quarantined = sum(1 for _, s, _ in rows if s == "quarantined")
    report.unaccounted = len(all_shas - set(status))
    report.valid_processed = sum(1 for sha in valid_shas if "done" in status.get(sha, set()))
    reasons = {json.loads(p.read_text())["sha256"] for p in (state / "quarantine").glob("*.reason.json")}
    quarantined_shas = {sha for sha, s, _ in rows if s == "quarantined"}
    report.unaccounted += len(quarantined_shas - reasons)  # a quarantine row without its reason file
    return report


# --- soak ----------------------------------------------------------------------------------------------------
@dataclass
class SoakReport:
    files: int = 0
    kills: int = 0
    kills_mid_file: int = 0  # kills that left a file in progress (the next start found an unfinished attempt)
    restarts: int = 0
    lost: int = 0
    duplicated: int = 0
    partial: int = 0
    unreadable_outputs: int = 0
    dciodvfy_errors: int | None = None
    ledger_consistent: bool = False
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.lost == self.duplicated == self.partial == self.unreadable_outputs == 0 and self.ledger_consistent
                and not self.dciodvfy_errors)

    def line(self) -> str:
        dciodvfy = "not installed" if self.dciodvfy_errors is None else str(self.dciodvfy_errors)
        return (f"soak {'PASS' if self.ok else 'FAIL'}: {self.files} files, {self.kills} SIGKILLs "
                f"({self.kills_mid_file} with a file in progress); lost {self.lost}, "
                f"duplicated {self.duplicated}, partial {self.partial}, unreadable outputs {self.unreadable_outputs}, "
                f"dciodvfy errors {dciodvfy}, ledger {'consistent' if self.ledger_consistent else 'INCONSISTENT'}; "
                f"{self.wall_seconds:.0f} s")


def run_soak(files: int, kills: int, workdir: Path, model: Path, *, seed: int = 0, size: int = 96,
             interval: tuple[float, float] = (1.0, 4.0), verify_dciodvfy: bool = True,
             finish_seconds: float = 600.0) -> SoakReport:
    """Drop ``files`` valid files while killing the daemon ``kills`` times; check nothing is lost or doubled."""
    import pydicom

    rng = random.Random(seed)
    watch, out, state = workdir / "watch", workdir / "out", workdir / "state"
    watch.mkdir(parents=True)
    config = _write_config(workdir / "soak.toml", stable_seconds=0.5, settle_seconds=0.2, batch_size=4,
                           log_json=True)
    command = _cli("run", "--config", str(config), "--watch", str(watch), "--out", str(out), "--state", str(state),
                   "--model", str(model), "--backend", "cpu")
    pixels = fixture_pixels(8, size)
    payloads = {i: synthetic_cr(f"{UID_ROOT}.{seed}.2.{i}", pixels[i % len(pixels)]) for i in range(files)}
    report = SoakReport(files=files)
    logs = []

    def start() -> subprocess.Popen:
        log = (workdir / f"daemon{len(logs)}.log").open("w")
        logs.append(log)
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)

    def wait_started(proc: subprocess.Popen, timeout: float = 180.0) -> None:
        """Kills are meant to land while files are processed, not while the model loads."""
        path = workdir / f"daemon{len(logs) - 1}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if '"event": "startup"' in path.read_text(errors="replace"):
                return
            time.sleep(0.1)

    def sender() -> None:
        for i, data in payloads.items():
            name = watch / f"img{i:05d}.dcm"
            if i % 3 == 0:
                part = name.with_name(name.name + ".part")
                part.write_bytes(data)
                part.rename(name)
            elif i % 3 == 1:
                with name.open("wb") as fh:
                    fh.write(data[:len(data) // 2])
                    fh.flush()
                    time.sleep(0.05)
                    fh.write(data[len(data) // 2:])
            else:
                name.write_bytes(data)
            time.sleep(rng.uniform(0.0, 0.05))

    t0 = time.monotonic()
    proc = start()
    writer = threading.Thread(target=sender, daemon=True)
    writer.start()
    try:
        for _ in range(kills):
            wait_started(proc)
            time.sleep(rng.uniform(*interval))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            report.kills += 1
            proc = start()
            report.restarts += 1
        writer.join()
        deadline = time.monotonic() + finish_seconds
        while time.monotonic() < deadline and len(list(out.glob("*/*.json"))) < files:
            if proc.poll() is not None:  # it must never die by itself
                proc = start()
                report.restarts += 1
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
    report.wall_seconds = time.monotonic() - t0
    report.kills_mid_file = sum('"event": "unfinished_attempts"' in (workdir / f"daemon{i}.log").read_text(
        errors="replace") for i in range(1, len(logs)))
    expected = {hashlib.sha256(data).hexdigest() for data in payloads.values()}
    sidecar_files = sorted(p for p in out.glob("*/*.json") if not p.parent.name.startswith(".")
                           and p.parent.name != "quarantine")
    seen: dict[str, int] = {}
    for path in sidecar_files:
        info = json.loads(path.read_text())
        seen[info["source"]["sha256"]] = seen.get(info["source"]["sha256"], 0) + 1
        for kind in ("secondary_capture", "segmentation"):
            output = info["outputs"].get(kind)
            if output is None:
                continue
            target = path.parent / output["file"]
            if not target.is_file():
                report.partial += 1
                continue
            try:
                pydicom.dcmread(target).pixel_array  # noqa: B018 - decoding is the check
            except Exception:
                report.unreadable_outputs += 1
    report.lost = len(expected - set(seen))
    report.duplicated = sum(n - 1 for n in seen.values()) + len(set(seen) - expected)
    report.partial += len(list(out.rglob("*.lungseg-tmp")))
    sc_count = len(list(out.glob("*/*.sc.dcm")))
    report.partial += abs(sc_count - len(sidecar_files))
    try:
        db = sqlite3.connect(f"{(state / 'ledger.sqlite3').resolve().as_uri()}?mode=ro", uri=True)
        instances = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        done = db.execute("SELECT COUNT(DISTINCT sha256) FROM files WHERE status='done'").fetchone()[0]
        quarantined = db.execute("SELECT COUNT(*) FROM files WHERE status='quarantined'").fetchone()[0]
        db.close()
        report.ledger_consistent = instances == done == len(sidecar_files) and quarantined == 0
    except sqlite3.Error:
        report.ledger_consistent = False
    exe = shutil.which("dciodvfy")
    if verify_dciodvfy and exe:
        report.dciodvfy_errors = 0
        for sc in sorted(out.glob("*/*.sc.dcm")):
            result = subprocess.run([exe, str(sc)], capture_output=True, text=True, errors="replace", timeout=60,
                                    check=False)
            report.dciodvfy_errors += sum(line.startswith("Error") for line in (result.stdout + result.stderr)
                                          .splitlines())
    return report


# --- isolation overhead --------------------------------------------------------------------------------------------
def measure_isolation(files: list[Path], repeat: int = 5, min_side: int = 256) -> dict[str, float]:
    """Median milliseconds per file: decode in-process vs through the worker (after one warm-up each)."""
    import logging
    import statistics
    import warnings

    from lungseg.edge_runtime.isolate import DecodeFailure, DecodeWorker, decode_in_process

    warnings.simplefilter("ignore")  # in-process decoding warns like the worker would (silenced there too)
    logging.disable(logging.WARNING)
    blobs = [path.read_bytes() for path in files]
    worker = DecodeWorker().start()
    try:
        for data in blobs:  # warm-up: imports, codec plugins, page cache
            decode_in_process(data, "warm", min_side=min_side)
            worker.decode(data, "warm", min_side)
        local, isolated = [], []
        for _ in range(repeat):
            for data in blobs:
                t0 = time.perf_counter()
                result = decode_in_process(data, "x", min_side=min_side)
                local.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                result = worker.decode(data, "x", min_side)
                isolated.append((time.perf_counter() - t0) * 1000)
                if isinstance(result, DecodeFailure):
                    raise RuntimeError(f"a measured file did not decode: {result.code}")
    finally:
        worker.close()
    in_process, through_worker = statistics.median(local), statistics.median(isolated)
    return {"files": len(files), "repeat": repeat, "min_side": min_side, "in_process_ms": round(in_process, 1),
            "worker_ms": round(through_worker, 1), "overhead_ms": round(through_worker - in_process, 1)}


# --- command line ------------------------------------------------------------------------------------------------
def _default_model() -> Path:
    return REPO_ROOT / "models" / "default" / "model.onnx"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/harness.py",
                                     description="Fuzz and kill -9 soak of lungseg-edge; one summary line each. "
                                     "Exit 0 when every check holds, 1 otherwise.")
    sub = parser.add_subparsers(dest="command", required=True)
    fuzz = sub.add_parser("fuzz", help="mutated DICOM corpus through run --once, twice")
    fuzz.add_argument("--inputs", type=int, default=2000)
    fuzz.add_argument("--valid", type=int, default=None, help="valid inputs added (default inputs/20)")
    fuzz.add_argument("--memory-limit", type=int, default=1_500_000_000, help="RLIMIT_AS bytes (0: none)")
    fuzz.add_argument("--size", type=int, default=96, help="side of the synthetic seed images")
    soak = sub.add_parser("soak", help="random SIGKILLs while files arrive")
    soak.add_argument("--files", type=int, default=300)
    soak.add_argument("--kills", type=int, default=15)
    soak.add_argument("--size", type=int, default=96)
    iso = sub.add_parser("isolation", help="per-file cost of decoding in the worker process")
    iso.add_argument("files", type=Path, nargs="+")
    iso.add_argument("--repeat", type=int, default=5)
    iso.add_argument("--min-side", type=int, default=256, help="decode_min_side (0: full resolution)")
    iso.add_argument("--json", action="store_true")
    for p in (fuzz, soak):
        p.add_argument("--model", type=Path, default=_default_model(), help="ONNX model (default: the shipped one)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--workdir", type=Path, default=None, help="keep the run here (default: a temp folder)")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.command == "isolation":
        result = measure_isolation(args.files, args.repeat, args.min_side)
        print(json.dumps(result) if args.json else
              f"isolation: {result['files']} files x {result['repeat']}, median decode {result['in_process_ms']} ms "
              f"in-process vs {result['worker_ms']} ms through the worker (overhead {result['overhead_ms']} ms, "
              f"decode_min_side {result['min_side']})")
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"lungseg-{args.command}-"))
    if args.command == "fuzz":
        report: Any = run_fuzz(args.inputs, workdir, args.model, seed=args.seed, size=args.size, valid=args.valid,
                               memory_limit=args.memory_limit or None)
    else:
        report = run_soak(args.files, args.kills, workdir, args.model, seed=args.seed, size=args.size)
    print(json.dumps({**asdict(report), "ok": report.ok, "workdir": str(workdir)}) if args.json else
          report.line() + f" (workdir {workdir})")
    if args.workdir is None and report.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
