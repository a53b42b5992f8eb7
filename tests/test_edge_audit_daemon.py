"""The audit trail, the disk guard and restart behaviour with the real service (issue 23)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from edge_helpers import REPO_ROOT, make_cr, save
from test_edge_daemon import Daemon, wait_until

from lungseg.edge_runtime import audit

UID = "1.2.826.0.1.3680043.10.1082.231."
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-4711-XY"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lungseg.edge_runtime.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def identifiable(sop: str, study: str):
    ds = make_cr(sop, study_uid=study, size=96)
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    return ds


def sidecars(out: Path) -> list[Path]:
    return sorted(out.rglob("*.json"))


@pytest.mark.integration
def test_audit_show_answers_for_a_stored_and_a_dropped_file_without_phi(tmp_path: Path, tiny_onnx: Path) -> None:
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.skip("storescu (dcmtk) is not installed")
    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    sent = save(identifiable(UID + "1", UID + "100"), tmp_path / "Doe_Jane_PID-4711-XY_sent.dcm")
    daemon = Daemon(tmp_path, watch, out, state, tiny_onnx, "--scp-port", "0", "--scp-allow", "PORTABLE1")
    try:
        assert daemon.wait_for_message("READY=1", 60), daemon.stderr_path.read_text()[-3000:]
        port = next(int(m.group(1)) for e in daemon.events() if e.get("event") == "scp_config"
                    and (m := re.search(r":(\d+)", e["msg"])))
        result = subprocess.run([storescu, "-aet", "PORTABLE1", "-aec", "LUNGSEG", "127.0.0.1", str(port), str(sent)],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        dropped = save(identifiable(UID + "2", UID + "100"), watch / "Doe_Jane_PID-4711-XY.dcm")
        assert wait_until(lambda: len(sidecars(out)) >= 2, 60), daemon.stderr_path.read_text()[-3000:]
        code, _ = daemon.terminate()
        assert code == 0
    finally:
        daemon.close()
    stored = watch / f"{UID}1.dcm"
    assert stored.is_file()

    shown = cli("audit", "show", "--state", str(state), "--file", str(stored), "--json")
    assert shown.returncode == 0, shown.stderr
    events = json.loads(shown.stdout)["events"]
    assert [e["event"] for e in events] == ["receive", "process", "output"]
    receive, process, output = events
    assert receive["calling_ae"] == "PORTABLE1" and receive["outcome"] == "stored"
    assert receive["file"] == process["file"] == output["file"]  # the receiver and the pipeline name it alike
    assert process["outcome"] == "done" and process["backend"] == "cpu" and process["bundle_sha256"]
    assert process["model_version"] and process["sop"].startswith("uid:")
    assert sorted(output["outputs"]) == ["json", "sc.dcm", "seg.dcm", "sr.dcm"]
    by_sop = cli("audit", "show", "--state", str(state), "--sop", UID + "1")
    assert by_sop.returncode == 0 and len(by_sop.stdout.splitlines()) == 3

    shown = cli("audit", "show", "--state", str(state), "--file", str(dropped), "--json")
    assert shown.returncode == 0, shown.stderr
    assert [e["event"] for e in json.loads(shown.stdout)["events"]] == ["process", "output"]
    text_view = cli("audit", "show", "--state", str(state), "--file", str(dropped))
    assert text_view.returncode == 0 and "outcome=done" in text_view.stdout

    verified = cli("audit", "verify", "--state", str(state))
    assert verified.returncode == 0, verified.stderr
    # privacy with the defaults: no patient name or ID, no file name, no UID in clear
    trail = "".join(p.read_text() for p in audit.trail_files(state / audit.FOLDER))
    assert trail.count('"event":') >= 7  # selftest, start, receive, 2 x process, 2 x output
    for secret in ("Doe", "Jane", "4711", "Doe_Jane_PID-4711-XY", "_sent", UID, UID.rstrip(".")):
        assert secret not in trail, secret


def test_a_restart_reads_no_file_the_ledger_already_knows(tmp_path: Path, tiny_onnx: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from lungseg.edge_runtime import admission, daemon
    from lungseg.edge_runtime.config import EdgeConfig

    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    for i in range(6):
        save(make_cr(f"{UID}5{i}", index=i, size=64), watch / f"{i}.dcm")
    reads: list[Path] = []
    real_read = admission.read_input

    def counting_read(path: Path, max_bytes: int):
        reads.append(path)
        return real_read(path, max_bytes)

    monkeypatch.setattr(admission, "read_input", counting_read)
    config = EdgeConfig(watch=watch, out=out, state=state, model=tiny_onnx, backend="cpu", once=True,
                        isolate_decode=False, stable_seconds=0.0).validate()
    assert daemon.run(config) == daemon.EXIT_OK
    first = len(reads)
    assert first == 6 and len(sidecars(out)) == 6
    assert daemon.run(config) == daemon.EXIT_OK
    assert len(reads) == first  # the second start read none of the six files again
    (watch / "0.dcm").write_bytes((watch / "0.dcm").read_bytes())  # changed (mtime, ctime): read again
    assert daemon.run(config) == daemon.EXIT_OK
    assert reads[first:] == [watch.resolve() / "0.dcm"]
    # every start is audited; a changed setting is a configuration change, the same model is no model change
    assert daemon.run(dataclasses.replace(config, batch_size=2)) == daemon.EXIT_OK
    events = [json.loads(x)["event"] for p in audit.trail_files(state / audit.FOLDER)
              for x in p.read_text().splitlines()]
    assert events.count("start") == 4 and events.count("config_change") == 1 and "model_change" not in events
    assert events.count("process") == 6  # the rewritten file had the same bytes: read, hashed, known, no event


# --- a real small file system -------------------------------------------------------------------------------------
SCENARIO = REPO_ROOT / "tests" / "diskguard_scenario.py"


def _can_mount_tmpfs(tmp_path: Path) -> str | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return "unshare (util-linux) is not installed"
    probe = tmp_path / "probe"
    probe.mkdir()
    result = subprocess.run([unshare, "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{probe}'"],
                            capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace here ({result.stderr.strip()[:200]})"
    return None


@pytest.mark.integration
def test_disk_guard_on_a_real_small_file_system(tmp_path: Path, tiny_onnx: Path) -> None:
    """A 24 MB tmpfs (in a private mount namespace): filling it past the watermark makes the receiver answer
    0xA700, the folder path wait and /healthz say why; freeing space processes every accepted file."""
    why = _can_mount_tmpfs(tmp_path)
    if why is not None:
        pytest.skip(why)
    mount = tmp_path / "fs"
    mount.mkdir()
    result = subprocess.run(["unshare", "-rm", sys.executable, str(SCENARIO), str(mount), str(tiny_onnx)],
                            capture_output=True, text=True, timeout=240, check=False, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["statuses_while_low"] == [0xA700]
    assert report["health_while_low"]["healthy"] is False
    assert any("low disk space" in p for p in report["health_while_low"]["problems"])
    assert report["outputs_while_low"] == report["outputs_before_low"]  # the folder path took no new work
    assert report["statuses_after"] == [0x0000]
    assert report["health_after"]["healthy"] is True
    assert report["accepted"] == report["processed"] and report["lost"] == 0
    assert report["audit_events"].count("disk_low") == 1 and report["audit_events"].count("disk_ok") == 1
    assert report["verify_rc"] == 0


def test_record_is_safe_without_a_trail() -> None:
    assert not audit.enabled()
    audit.record("process", sop=UID + "1")  # a no-op, never an error
    assert not audit.enabled()


@pytest.mark.integration
def test_forwarding_is_audited_failed_then_sent(tmp_path: Path, tiny_onnx: Path) -> None:
    from edge_helpers import run_once
    from test_edge_forward import StorageSCP, free_port

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    save(make_cr(UID + "61", size=64), watch / "a.dcm")
    port = free_port()
    settings = {"forward_host": "127.0.0.1", "forward_port": port, "forward_ae": "TESTPACS",
                "forward_retry_seconds": 1.0}
    assert run_once(watch, out, tiny_onnx, **settings) == 0  # the peer is down
    from lungseg.edge_runtime.ledger import Ledger

    ledger = Ledger(out / ".lungseg-state")
    ledger.db.execute("UPDATE forward SET next_try=0")
    ledger.db.commit()
    ledger.close()
    scp = StorageSCP(port)
    try:
        assert run_once(watch, out, tiny_onnx, **settings) == 0
    finally:
        scp.close()
    shown = cli("audit", "show", "--state", str(out / ".lungseg-state"), "--sop", UID + "61", "--json")
    events = [e for e in json.loads(shown.stdout)["events"] if e["event"] == "forward"]
    assert [(e["outcome"], e["output"]) for e in events] == [
        ("failed", "sc"), ("failed", "seg"), ("failed", "sr"), ("sent", "sc"), ("sent", "seg"), ("sent", "sr")]
    assert all(e["peer"] == "TESTPACS" for e in events) and events[0]["error"]
    assert UID not in json.dumps(events)
