"""The disk-guard scenario on a real small file system (run by tests/test_edge_audit_daemon.py, in a private
user + mount namespace: ``unshare -rm python tests/diskguard_scenario.py MOUNT_DIR MODEL``).

Mounts a 24 MB tmpfs on MOUNT_DIR, runs ``lungseg-edge run`` with its watch, output and state folders there
(receiver and metrics on 127.0.0.1, watermark 8 MB), fills the file system below the watermark, checks what
the service does, frees the space, and prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_helpers import associate, make_cr, save

UID = "1.2.826.0.1.3680043.10.1082.232."
WATERMARK_MB = 8


def wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return bool(predicate())


def main(mount: Path, model: Path) -> int:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    watch, out, state = mount / "watch", mount / "out", mount / "state"
    watch.mkdir()
    log_path = mount.parent / "scenario-daemon.log"  # outside the small file system
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--watch", str(watch), "--out", str(out),
             "--state", str(state), "--model", str(model), "--backend", "cpu", "--log-json", "--stable-seconds", "0.5",
             "--scp-port", "0", "--metrics-port", "0", "--disk-min-free-mb", str(WATERMARK_MB),
             "--disk-min-free-percent", "0", "--no-isolate-decode"],
            stdout=subprocess.DEVNULL, stderr=log)
    try:
        return _scenario(proc, log_path, watch, out, state)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _events(log_path: Path) -> list[dict]:
    return [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]


def _store(port: int, sop: str) -> int:
    assoc = associate(port, classes=["1.2.840.10008.5.1.4.1.1.1"])
    if not assoc.is_established:
        return -1
    try:
        return int(assoc.send_c_store(make_cr(sop, size=96)).Status)
    finally:
        assoc.release()


def _health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def _scenario(proc: subprocess.Popen, log_path: Path, watch: Path, out: Path, state: Path) -> int:
    def sidecars() -> int:
        return len(list(out.rglob("*.json")))

    if not wait(lambda: any(e.get("event") == "scan" for e in _events(log_path)), 60):
        print(log_path.read_text()[-3000:], file=sys.stderr)
        return 1
    events = _events(log_path)
    scp_port = next(int(m.group(1)) for e in events if e.get("event") == "scp_config"
                    and (m := re.search(r":(\d+)", e["msg"])))
    metrics_port = next(int(e["port"]) for e in events if e.get("event") == "metrics_config")
    accepted = 0
    for i in range(2):
        accepted += _store(scp_port, f"{UID}{i}") == 0
    wait(lambda: sidecars() >= 2, 30)
    before = sidecars()
    st = os.statvfs(watch)
    free = st.f_bavail * st.f_frsize
    ballast = watch.parent / "ballast"
    with ballast.open("wb") as fh:  # leave about half the watermark free
        fh.write(b"\0" * (free - (WATERMARK_MB << 20) // 2))
    time.sleep(1.5)  # the guard looks once a second
    for i in range(2):  # the device drops two files into the folder meanwhile
        save(make_cr(f"{UID}1{i}", index=i + 2, size=96), watch / f"device{i}.dcm")
        accepted += 1
    statuses_low = [_store(scp_port, f"{UID}20")]
    time.sleep(3.0)
    while_low, health_low = sidecars(), _health(metrics_port)
    ballast.unlink()
    wait(lambda: sidecars() >= before + 2, 30)
    statuses_after = [_store(scp_port, f"{UID}30")]
    accepted += statuses_after.count(0)
    wait(lambda: sidecars() >= accepted, 30)
    health_after = _health(metrics_port)
    processed = sidecars()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    trail = [json.loads(x) for p in sorted((state / "audit").glob("*.jsonl")) for x in p.read_text().splitlines()]
    verify = subprocess.run([sys.executable, "-m", "lungseg.edge_runtime.cli", "audit", "verify", "--state",
                             str(state)], capture_output=True, text=True, timeout=60, check=False)
    print(json.dumps({"statuses_while_low": statuses_low, "health_while_low": health_low,
                      "outputs_before_low": before, "outputs_while_low": while_low,
                      "statuses_after": statuses_after, "health_after": health_after, "accepted": accepted,
                      "processed": processed, "lost": accepted - processed,
                      "audit_events": [e["event"] for e in trail], "verify_rc": verify.returncode,
                      "exit_code": proc.returncode}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
