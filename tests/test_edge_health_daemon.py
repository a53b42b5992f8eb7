"""``/healthz`` tells the truth, and the HTTP endpoint stays bounded: a real daemon process, real HTTP.

* the output folder turns read-only while the daemon runs (a read-only bind mount over it, in the daemon's own
  mount namespace): every write fails, and ``/healthz`` answers 503 with the reason ``faults`` within
  ``health_fault_seconds`` of the first failed write; retries do not reset the clock; it recovers once the folder
  is writable again;
* 200 idle connections to the endpoint, under an fd limit of 128: neither 200 threads nor a stalled pipeline, and
  ``/healthz`` still answers.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from edge_helpers import REPO_ROOT, make_cr, save
from orthanc_chain import free_port, wait_for

pytest.importorskip("prometheus_client", reason="prometheus-client (the [metrics] extra) is not installed")
pytestmark = pytest.mark.integration

UID = "1.2.826.0.1.3680043.10.1082.78."
FAULT_SECONDS = 2.0


def _healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return None


def _start(tmp_path: Path, model: Path, prefix: list[str], extra: list[str] = (), preexec=None):
    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    port = free_port()
    cmd = [*prefix, sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--watch", str(watch), "--out", str(out),
           "--state", str(state), "--backend", "cpu", "--model", str(model), "--metrics-port", str(port),
           "--stable-seconds", "0.2", "--settle-seconds", "0", "--run-as-root", "allow", *extra]
    log = (tmp_path / "edge.log").open("wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, preexec_fn=preexec,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError((tmp_path / "edge.log").read_text()[-3000:])
        try:
            return _healthz(port)[0] == 200
        except OSError:
            return False

    wait_for("the daemon's /healthz", up, 120)
    return process, port


def _stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def _mount_tools_missing() -> str | None:
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"no mount namespaces here ({probe.stderr.decode().strip()})"
    return None


def test_read_only_output_turns_healthz_503_within_the_fault_window(tmp_path: Path, tiny_onnx: Path) -> None:
    if (reason := _mount_tools_missing()) is not None:
        pytest.skip(reason)
    process, port = _start(tmp_path, tiny_onnx, ["unshare", "-m", "--propagation", "private"],
                           ["--health-fault-seconds", str(FAULT_SECONDS), "--retry-seconds", "0.5",
                            "--max-retry-seconds", "1"])
    out, ro = tmp_path / "out", tmp_path / "ro"
    ro.mkdir()
    ns = ["nsenter", "-t", str(process.pid), "-m"]
    try:
        save(make_cr(UID + "1", size=64), tmp_path / "watch" / "a.dcm")
        wait_for("the first file", lambda: _metric(port, "lungseg_processed_total") == 1, 60)
        assert _healthz(port)[0] == 200
        # the output folder turns read-only under the running daemon (same disk: the disk guard stays quiet)
        subprocess.run([*ns, "mount", "--bind", "-o", "ro", str(ro), str(out)], check=True)
        dropped = time.monotonic()
        save(make_cr(UID + "2", size=64, index=1), tmp_path / "watch" / "b.dcm")
        wait_for("a failed write", lambda: (_metric(port, 'lungseg_faults_total{code="write_failed"}') or 0) >= 1,
                 30)
        _, body = wait_for("/healthz 503", lambda: (s := _healthz(port))[0] == 503 and s, 30, interval=0.1)
        took = time.monotonic() - dropped
        assert "faults" in body["reasons"] and body["fault_seconds"] == FAULT_SECONDS, body
        assert took < FAULT_SECONDS + 10.0, f"503 only after {took:.1f} s"
        # retries go on (every <= 1 s) and do not reset the clock: it stays 503
        for _ in range(4):
            time.sleep(0.5)
            status, body = _healthz(port)
            assert status == 503 and "faults" in body["reasons"], body
        assert (_metric(port, 'lungseg_faults_total{code="write_failed"}') or 0) >= 2
        assert _metric(port, 'lungseg_health_problem{reason="faults"}') == 1
        assert _metric(port, "lungseg_healthy") == 0
        # writable again: the next retry succeeds and health recovers
        subprocess.run([*ns, "umount", str(out)], check=True)
        wait_for("the second file", lambda: _metric(port, "lungseg_processed_total") == 2, 30)
        assert _healthz(port)[0] == 200
        assert _stop(process) == 0
    finally:
        _stop(process)
    print(f"read-only output: /healthz 503 {took:.1f} s after the file was dropped "
          f"(health_fault_seconds = {FAULT_SECONDS})")


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_idle_connections_neither_hold_threads_nor_stall_the_pipeline(tmp_path: Path, tiny_onnx: Path) -> None:
    from lungseg.edge_runtime.service_metrics import HTTP_MAX_CONNECTIONS

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    process, port = _start(tmp_path, tiny_onnx, [], preexec=low_fd_limit)
    idle: list[socket.socket] = []
    try:
        time.sleep(1.5)  # the runtime's own threads (thread pools, decode worker pipes) are up by now
        baseline = _threads(process.pid)
        for _ in range(200):  # connect, send nothing
            sock = socket.socket()
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            idle.append(sock)
        time.sleep(0.5)
        threads = _threads(process.pid)
        assert threads <= baseline + HTTP_MAX_CONNECTIONS + 4, (baseline, threads)
        t0 = time.monotonic()
        status, _ = _healthz(port)
        answered = time.monotonic() - t0
        assert status == 200 and answered < 3.0, answered
        save(make_cr(UID + "3", size=64), tmp_path / "watch" / "c.dcm")  # the pipeline still works
        wait_for("the file processed", lambda: _metric(port, "lungseg_processed_total") == 1, 60)
        assert len(list((tmp_path / "out").rglob("*.sc.dcm"))) == 1
        assert (_metric(port, "lungseg_http_refused_total") or 0) >= 200 - HTTP_MAX_CONNECTIONS - 64
        assert _threads(process.pid) <= baseline + HTTP_MAX_CONNECTIONS + 4
        assert _stop(process) == 0
    finally:
        for sock in idle:
            sock.close()
        _stop(process)
    print(f"200 idle connections, RLIMIT_NOFILE 128: threads {baseline} -> {threads}, /healthz in {answered:.2f} s")


def _immutable(folder: Path, on: bool) -> bool:
    result = subprocess.run(["chattr", "+i" if on else "-i", str(folder)], capture_output=True)
    return result.returncode == 0


def _run_until_output(watch: Path, out: Path, model: Path) -> int:
    """The service (receiver on a free port) in a thread until one SC is written, then stopped."""
    import threading

    from lungseg.edge_runtime.config import EdgeConfig
    from lungseg.edge_runtime.daemon import run

    config = EdgeConfig(watch=watch, out=out, model=model, backend="cpu", stable_seconds=0.0, settle_seconds=0.0,
                        scp_port=0, quarantine_grace_seconds=0.0).validate()
    stop = threading.Event()
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(run(config, stop)))
    worker.start()
    try:
        wait_for("the output", lambda: next(out.rglob("*.sc.dcm"), None) or not worker.is_alive(), 60)
    finally:
        stop.set()
        worker.join(30)
    assert result, "the service did not stop"
    return result[0]


def test_start_survives_stale_temps_it_cannot_delete_and_keeps_the_state_private(tmp_path: Path, tiny_onnx: Path,
                                                                                   caplog) -> None:
    """A temp left in a folder that cannot be written (immutable here: root ignores modes) is logged and left;
    the state and quarantine folders are 0700 under a umask of 022; running as root is warned about."""
    import logging

    if shutil.which("chattr") is None:
        pytest.skip("chattr (e2fsprogs) is not installed")
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    quarantine = out / "quarantine"
    quarantine.mkdir(parents=True)
    stale = quarantine / ".left-by-a-killed-run.dcm.lungseg-tmp"
    stale.write_bytes(b"partial")
    received = watch / ".partial-store.lungseg-tmp"  # the receiver's temp, in a watch folder it cannot write
    received.write_bytes(b"partial")
    save(make_cr(UID + "9", size=64), watch / "a.dcm")
    if not _immutable(quarantine, True):
        pytest.skip("this file system has no immutable flag (chattr +i)")
    _immutable(watch, True)
    previous = os.umask(0o022)
    try:
        with caplog.at_level(logging.WARNING, logger="lungseg.edge"):
            code = _run_until_output(watch, out, tiny_onnx)
    finally:
        os.umask(previous)
        _immutable(quarantine, False)
        _immutable(watch, False)
    assert code == 0
    assert stale.exists() and received.exists()  # left, not fatal
    assert any(getattr(r, "event", "") == "stale_temp_kept" for r in caplog.records)
    assert any("cannot remove the stale temp file" in r.getMessage() for r in caplog.records)
    assert len(list(out.rglob("*.sc.dcm"))) == 1
    state = out / ".lungseg-state"
    assert state.stat().st_mode & 0o777 == 0o700
    if os.geteuid() == 0:
        assert any(getattr(r, "event", "") == "root_warning" for r in caplog.records)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs to run as root to see the refusal")
def test_run_as_root_refuse_exits_with_a_configuration_error(tmp_path: Path, tiny_onnx: Path) -> None:
    from edge_helpers import run_once

    (tmp_path / "watch").mkdir()
    assert run_once(tmp_path / "watch", tmp_path / "out", tiny_onnx, run_as_root="refuse") == 2
    assert not (tmp_path / "out").exists()  # refused before touching anything
