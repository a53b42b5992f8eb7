"""The real ``lungseg-edge run`` process: partial writes, renames, duplicates, junk, SIGTERM, restart."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from edge_helpers import dicom_bytes, file_ref, make_cr, sc_files, sidecars, write_in_two_halves

UID_ROOT = "1.2.826.0.1.3680043.10.1082.77."


class Daemon:
    """``python -m lungseg.edge_runtime.cli run`` with a NOTIFY_SOCKET we listen on (sd_notify)."""

    def __init__(self, tmp: Path, watch: Path, out: Path, state: Path, model: Path, *extra: str):
        self.sock_path = tmp / f"notify-{time.monotonic_ns()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        env = {**os.environ, "NOTIFY_SOCKET": str(self.sock_path), "PYTHONUNBUFFERED": "1"}
        self.stderr_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--watch", str(watch), "--out", str(out),
             "--state", str(state), "--model", str(model), "--backend", "cpu", "--log-json",
             "--stable-seconds", "1.0", *extra],
            stdout=subprocess.DEVNULL, stderr=self.stderr, env=env,
        )

    def wait_for_message(self, prefix: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m.startswith(prefix) for m in self.messages):
                return True
            if self.proc.poll() is not None:
                return False
            try:
                self.messages.extend(self.sock.recv(4096).decode().splitlines())
            except TimeoutError:
                continue
        return False

    def terminate(self) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=15)
        return code, time.monotonic() - t0

    def events(self) -> list[dict]:
        self.stderr.flush()
        lines = self.stderr_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
        self.sock.close()


def wait_until(predicate, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def valid(i: int, **kwargs) -> bytes:
    return dicom_bytes(make_cr(f"{UID_ROOT}{i}", index=i, size=96, **kwargs))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    return watch, out, state


@pytest.mark.integration
def test_daemon_handles_partial_writes_duplicates_junk_and_restart(
        tmp_path: Path, folders: tuple[Path, Path, Path], tiny_onnx: Path) -> None:
    watch, out, state = folders
    payloads = {i: valid(i) for i in range(23)}
    daemon = Daemon(tmp_path, watch, out, state, tiny_onnx, "--batch-size", "4")
    try:
        assert daemon.wait_for_message("READY=1", 60), daemon.stderr_path.read_text()[-3000:]
        writers = []
        for i in range(20):
            name = f"img{i:02d}.dcm"
            if i % 3 == 0:  # slow sender: half, pause with the file open, rest
                writers.append(write_in_two_halves(watch / name, payloads[i], pause=1.5))
            elif i % 3 == 1:  # the .part convention: write, then rename
                (watch / f"{name}.part").write_bytes(payloads[i])
                (watch / f"{name}.part").rename(watch / name)
            else:  # no extension, plain write
                (watch / f"IMG{i:02d}").write_bytes(payloads[i])
        (watch / "copy-of-img01.dcm").write_bytes(payloads[1])  # same bytes, other name
        (watch / "reencoded-img02").write_bytes(valid(2, pixel_spacing=(0.2, 0.2)))  # same UID, other bytes
        (watch / "junk.dcm").write_bytes(os.urandom(4096))
        (watch / "notes.txt").write_text("not an image\n")
        (watch / "truncated.dcm").write_bytes(valid(99)[:3000])
        (watch / ".hidden.dcm").write_bytes(valid(98))
        (watch / "still-coming.dcm.part").write_bytes(valid(97)[:2000])
        for thread in writers:
            thread.join()

        quarantine = state / "quarantine"
        assert wait_until(lambda: len(sidecars(out)) >= 20 and len(list(quarantine.glob("*.reason.json"))) >= 3,
                          90), daemon.stderr_path.read_text()[-3000:]
        time.sleep(2.5)  # give late (wrong) outputs a chance to appear
        assert daemon.proc.poll() is None  # junk did not stop it
        code, took = daemon.terminate()
        assert code == 0
        assert took < 10

        written = {hashlib.sha256(payloads[i]).hexdigest() for i in range(20)}
        processed = sidecars(out)
        assert len(processed) == 20
        assert len(sc_files(out)) == 20
        assert {s["source"]["sha256"] for s in processed} == written  # no output from a partial file
        reasons = {p.name.removesuffix(".reason.json"): json.loads(p.read_text())
                   for p in quarantine.glob("*.reason.json")}
        assert set(reasons) == {file_ref(state, watch, n) for n in ("junk.dcm", "notes.txt", "truncated.dcm")}
        assert not list(out.rglob("*.lungseg-tmp"))
        events = daemon.events()
        assert sum(e.get("event") == "duplicate" for e in events) == 2
        assert all("Synthetic" not in json.dumps(e) and "SYN-0001" not in json.dumps(e) for e in events)

        # dropped while it is down: three new files and a renamed copy of a done one
        for i in (20, 21, 22):
            (watch / f"late{i}.dcm").write_bytes(payloads[i])
        (watch / "late-copy-of-img05.dcm").write_bytes(payloads[5])
        first_mtimes = {p: p.stat().st_mtime_ns for p in sc_files(out)}
        daemon.close()
        daemon = Daemon(tmp_path, watch, out, state, tiny_onnx)
        assert daemon.wait_for_message("READY=1", 60), daemon.stderr_path.read_text()[-3000:]
        assert wait_until(lambda: len(sidecars(out)) >= 23, 60), daemon.stderr_path.read_text()[-3000:]
        time.sleep(2.5)
        code, took = daemon.terminate()
        assert code == 0 and took < 10
        events = daemon.events()
        assert sum(e.get("event") == "processed" for e in events) == 3  # nothing processed twice
        assert len(sc_files(out)) == 23
        assert {p: p.stat().st_mtime_ns for p in first_mtimes} == first_mtimes
    finally:
        daemon.close()


@pytest.mark.integration
def test_sigterm_mid_batch_leaves_no_partial_outputs(
        tmp_path: Path, folders: tuple[Path, Path, Path], tiny_onnx: Path) -> None:
    watch, out, state = folders
    total = 24
    for i in range(total):
        (watch / f"f{i:02d}.dcm").write_bytes(dicom_bytes(make_cr(f"{UID_ROOT}{100 + i}", index=i, size=256)))
    daemon = Daemon(tmp_path, watch, out, state, tiny_onnx, "--batch-size", "6", "--seg")
    try:
        assert wait_until(lambda: any(e.get("event") == "processed" for e in daemon.events()), 60), \
            daemon.stderr_path.read_text()[-3000:]
        code, took = daemon.terminate()
        assert code == 0 and took < 10
        assert not list(out.rglob("*.lungseg-tmp"))
        done = sidecars(out)
        assert len(done) < total
        for sidecar in done:  # every published sidecar has both DICOM objects beside it
            folder = out / sidecar["source"]["study_instance_uid"]
            assert (folder / sidecar["outputs"]["secondary_capture"]["file"]).is_file()
            assert (folder / sidecar["outputs"]["segmentation"]["file"]).is_file()
        assert len(sc_files(out)) == len(done)
    finally:
        daemon.close()
    # the rest is done on the next start, the rest only
    rerun = subprocess.run(
        [sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--once", "--watch", str(watch), "--out", str(out),
         "--state", str(state), "--model", str(tiny_onnx), "--backend", "cpu", "--seg", "--log-json"],
        capture_output=True, text=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    processed = [json.loads(line) for line in rerun.stderr.splitlines()
                 if line.startswith("{") and '"processed"' in line]
    assert len(processed) == total - len(done)
    assert len(sc_files(out)) == total


def test_sd_notify_reaches_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lungseg.edge_runtime.sdnotify import Notifier, notify

    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "2000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert notify("STATUS=hello")
        assert sock.recv(100) == b"STATUS=hello"
        notifier = Notifier()
        assert notifier.period == 1.0
        notifier.ready("up")
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
        notifier._last = 0.0
        notifier.ping()
        assert sock.recv(100) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")


def test_watcher_waits_for_close_and_ignores_temp_names(tmp_path: Path) -> None:
    from lungseg.edge_runtime.watcher import ReadyTracker, make_observer

    tracker = ReadyTracker(root=tmp_path, inotify=True, stable_seconds=0.3, settle_seconds=0.2)
    observer = make_observer(tracker, polling=False, poll_interval=1.0)
    observer.start()
    try:
        release = threading.Event()

        def slow_writer() -> None:
            with (tmp_path / "slow.dcm").open("wb") as fh:
                fh.write(b"x" * 100)
                fh.flush()
                release.wait(5)
                fh.write(b"y" * 100)

        thread = threading.Thread(target=slow_writer)
        thread.start()
        (tmp_path / "a.part").write_bytes(b"p")
        (tmp_path / ".hidden").write_bytes(b"h")
        time.sleep(1.0)  # far past stable_seconds: still open, so not ready
        assert tracker.take_ready() == []
        release.set()
        thread.join()
        (tmp_path / "a.part").rename(tmp_path / "a.dcm")
        got: list[Path] = []
        assert wait_until(lambda: got.extend(tracker.take_ready()) or len(got) == 2, 5)
        assert sorted(p.name for p in got) == ["a.dcm", "slow.dcm"]
        assert (tmp_path / "slow.dcm").stat().st_size == 200
    finally:
        observer.stop()
        observer.join()


def test_polling_mode_waits_for_a_stable_size(tmp_path: Path) -> None:
    from lungseg.edge_runtime.watcher import ReadyTracker, make_observer

    tracker = ReadyTracker(root=tmp_path, inotify=False, stable_seconds=2.0, settle_seconds=0.1)
    observer = make_observer(tracker, polling=True, poll_interval=0.2)
    observer.start()
    try:
        path = tmp_path / "net.dcm"
        with path.open("wb") as fh:  # a remote writer: no close event is ever seen
            fh.write(b"a" * 10)
            fh.flush()
            for _ in range(4):
                time.sleep(0.3)
                assert tracker.take_ready() == []
                fh.write(b"b" * 10)
                fh.flush()
        got: list[Path] = []
        assert wait_until(lambda: got.extend(tracker.take_ready()) or bool(got), 5)
        assert got == [path] and path.stat().st_size == 50
    finally:
        observer.stop()
        observer.join()
