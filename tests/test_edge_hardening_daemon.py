"""The real ``lungseg-edge run`` service: no PHI in what it writes, a recreated watch folder, chunked senders."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edge_helpers import dicom_bytes, make_cr, sc_files, sidecars
from test_edge_daemon import wait_until

pytestmark = pytest.mark.integration  # the daemon as a process: signals, restarts, its logs

UID = "1.2.826.0.1.3680043.10.1082.112."
PHI = {
    "name": "Quixotefield",
    "given": "Zebediah",
    "id": "PID77QX31415",
    "birth": "19230417",
    "accession": "ACCQX271828",
}


def phi_dataset(sop_uid: str, index: int):
    """A valid radiograph full of distinctive fake PHI, some of it invalid for its VR (pydicom warns, quoting it)."""
    ds = make_cr(sop_uid, index=index, size=96)
    ds.PatientName = f"{PHI['name']}^{PHI['given']}"
    ds.PatientID = PHI["id"] + "-" + "X" * 70  # longer than LO allows
    ds.PatientBirthDate = PHI["birth"] + "x"  # not a DA
    ds.AccessionNumber = PHI["accession"]
    ds.OtherPatientIDs = PHI["id"]
    ds.StudyDescription = f"chest {PHI['name']} {PHI['id']}"
    return ds


@pytest.mark.slow
def test_no_phi_in_logs_or_names_and_the_watch_folder_recreated(tmp_path: Path, tiny_onnx: Path) -> None:
    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    patient_folder = watch / f"{PHI['name']}_{PHI['given']}"
    patient_folder.mkdir(parents=True)
    (patient_folder / f"{PHI['name']}_{PHI['given']}_chest.dcm").write_bytes(dicom_bytes(phi_dataset(UID + "1", 0)))
    (watch / f"{PHI['name']}_{PHI['id']}.dcm").write_bytes(dicom_bytes(phi_dataset(UID + "2", 1)))
    truncated = dicom_bytes(phi_dataset(UID + "3", 2))[:2500]  # still carries the patient module
    (watch / f"{PHI['name']}_broken.dcm").write_bytes(truncated)
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--watch", str(watch), "--out", str(out),
             "--state", str(state), "--model", str(tiny_onnx), "--backend", "cpu", "--log-json", "-vv",
             "--stable-seconds", "0.5"], stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            quarantine = state / "quarantine"
            assert wait_until(lambda: len(sidecars(out)) >= 2 and len(list(quarantine.glob("*.reason.json"))) >= 1,
                              60), log_path.read_text()[-3000:]

            # a sender that closes the file between chunks: partial copies are never quarantined
            chunked = dicom_bytes(make_cr(UID + "4", index=3, size=96))
            target = watch / "chunked.dcm"
            for part in (chunked[:1500], chunked[1500:6000], chunked[6000:]):
                with target.open("ab") as fh:
                    fh.write(part)
                time.sleep(1.2)
            assert wait_until(lambda: len(sidecars(out)) >= 3, 30), log_path.read_text()[-3000:]

            # the watch folder deleted and created again is watched again within seconds (not at the rescan)
            shutil.rmtree(watch)
            time.sleep(1.5)
            watch.mkdir()
            time.sleep(1.5)
            (watch / "after.dcm").write_bytes(dicom_bytes(make_cr(UID + "5", index=4, size=96)))
            t0 = time.monotonic()
            assert wait_until(lambda: len(sidecars(out)) >= 4, 20), log_path.read_text()[-3000:]
            assert time.monotonic() - t0 < 15
            assert proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    assert len(list((state / "quarantine").glob("*.reason.json"))) == 1  # only the truncated file
    assert len(sc_files(out)) == 4

    text = log_path.read_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "watch_restored" for e in events)
    leaks = {key: value for key, value in PHI.items() if value in text}
    assert not leaks, [line for line in text.splitlines() if any(v in line for v in leaks.values())][:5]
    written = [p for p in list(state.rglob("*")) + list(out.rglob("*"))]
    assert not [p.name for p in written if any(v in p.name for v in PHI.values())]
    for path in written:  # reason files, sidecars, the backend/crash notes: no value anywhere
        if path.is_file() and path.suffix in (".json", ".log"):
            assert not any(v in path.read_text(errors="replace") for v in PHI.values()), path.name
    db = sqlite3.connect(state / "ledger.sqlite3")
    dump = "\n".join(db.iterdump())
    db.close()
    assert not any(v in dump for v in PHI.values())


@pytest.mark.slow
def test_fatal_signal_mid_file_quarantines_that_file_on_the_next_start(tmp_path: Path, tiny_onnx: Path) -> None:
    """A native crash of the daemon while a file is alone in progress (inference, writing): on the next start
    that file is quarantined (``processing_crash``) and the others processed; no crash loop."""
    import hashlib
    import os
    import signal

    from edge_helpers import file_ref, run_once

    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    big = dicom_bytes(make_cr(UID + "60", size=2500))
    (watch / "big.dcm").write_bytes(big)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--watch", str(watch), "--out", str(out),
         "--state", str(state), "--model", str(tiny_onnx), "--backend", "cpu", "--log-json", "--stable-seconds",
         "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def in_progress() -> bool:
            if not (state / "ledger.sqlite3").is_file():
                return False
            try:
                db = sqlite3.connect(f"{(state / 'ledger.sqlite3').as_uri()}?mode=ro", uri=True, timeout=1)
                rows = db.execute("SELECT sha256 FROM attempts WHERE solo=1").fetchall()  # alone in progress
                db.close()
            except sqlite3.Error:
                return False
            return bool(rows)

        assert wait_until(in_progress, 60, step=0.01)
        os.kill(proc.pid, signal.SIGSEGV)
        assert proc.wait(timeout=30) == -signal.SIGSEGV
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (state / "crash.log").stat().st_size > 0  # faulthandler wrote the fatal signal down
    (watch / "small.dcm").write_bytes(dicom_bytes(make_cr(UID + "61", index=1, size=64)))
    assert run_once(watch, out, tiny_onnx, state=state) == 1
    reason = json.loads((state / "quarantine" / f"{file_ref(state, watch, 'big.dcm')}.reason.json").read_text())
    assert reason["code"] == "processing_crash" and reason["sha256"] == hashlib.sha256(big).hexdigest()
    assert len(sc_files(out)) == 1
    assert list(state.glob("crash.log.*"))
