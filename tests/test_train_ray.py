"""Repetitions as Ray tasks on a real local Ray instance (two workers, tiny data).

While a run is up, every TCP socket its Ray processes listen on must be on loopback: the local
instance must not expose Ray's control ports (GCS, raylet, workers, agents) to the network.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
pytest.importorskip("ray", reason="Ray (the [cluster] extra) is not installed")

TINY = ["--batch-size", "4", "--init-features", "4", "--image-size", "128", "--device", "cpu", "--workers", "1",
        "--executor", "ray", "--ray-workers", "2"]


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # exited meanwhile
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    return children


def _process_tree(root: int) -> list[int]:
    """``root`` and all its descendants: the driver, Ray's GCS, raylet, agents and workers."""
    children, tree, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _listening_sockets() -> dict[int, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """Socket inode -> (address, port) of every listening TCP socket, from /proc/net/tcp and tcp6."""
    sockets = {}
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            sockets[int(fields[9])] = (ip, int(port, 16))
    return sockets


def _is_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how a dual-stack 127.0.0.1 listener reads
    return (mapped or ip).is_loopback


def _ray_listeners(root: int) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of each TCP socket that ``root``'s process tree listens on."""
    sockets, found = _listening_sockets(), []
    for pid in _process_tree(root):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue  # exited meanwhile (or a descriptor closed between listing and reading)
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in sockets:
                ip, port = sockets[int(link[8:-1])]
                found.append((pid, Path(name).name, str(ip), port))
    return found


def assert_ray_listens_on_loopback_only(driver: int) -> None:
    listeners = _ray_listeners(driver)
    names = {name for _, name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, f"Ray's GCS and raylet should be up and listening: {listeners}"
    exposed = [x for x in listeners if not _is_loopback(ipaddress.ip_address(x[2]))]
    assert not exposed, f"local Ray listens on non-loopback addresses (pid, process, address, port): {exposed}"


def _epochs(rep: Path) -> list[int]:
    log = rep / "log.jsonl"
    return [json.loads(x)["epoch"] for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []


def _command(manifest: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lungseg.train.cli", "stage1", "--data", str(manifest), "--out", str(out),
            "--repetitions", "2", "--max-epochs", str(epochs), *TINY, *extra]


@pytest.mark.slow
def test_two_workers_run_two_repetitions_in_parallel(tmp_path, fixture_manifest):
    out = tmp_path / "run"
    reps = [out / "stage1" / f"rep{i:02d}" for i in range(2)]
    output = tmp_path / "output.txt"
    with output.open("wb") as sink:
        proc = subprocess.Popen(_command(fixture_manifest, out, 3), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not (reps[0] / "worker.pid").is_file():
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before its first Ray task started"
        assert_ray_listens_on_loopback_only(proc.pid)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output.read_text(errors="replace")[-4000:]
    for rep in reps:
        assert (rep / "done.json").is_file() and _epochs(rep) == [1, 2, 3]
    pids = {(rep / "worker.pid").read_text().strip() for rep in reps}
    assert len(pids) == 2 and str(os.getpid()) not in pids, "each repetition ran in its own Ray worker"
    # both ran at once: each started before the other finished
    starts = [(rep / "worker.pid").stat().st_mtime for rep in reps]
    ends = [(rep / "done.json").stat().st_mtime for rep in reps]
    assert starts[0] < ends[1] and starts[1] < ends[0], (starts, ends)


@pytest.mark.slow
def test_killed_worker_then_rerun_resumes_instead_of_restarting(tmp_path, fixture_manifest):
    out = tmp_path / "run"
    epochs = 12
    command = _command(fixture_manifest, out, epochs, "--ray-retries", "0")
    rep0 = out / "stage1" / "rep00"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (len(_epochs(rep0)) >= 2 and (rep0 / "last.pt").is_file()):
        time.sleep(0.05)
    before = len(_epochs(rep0))
    try:
        assert 2 <= before < epochs, "the worker should be killed mid-run"
        assert_ray_listens_on_loopback_only(proc.pid)
    except AssertionError:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    os.kill(int((rep0 / "worker.pid").read_text()), signal.SIGKILL)
    assert proc.wait(timeout=180) != 0, "with no retries a lost worker fails the run"
    assert not (rep0 / "done.json").exists()
    killed_at = len(_epochs(rep0))

    rerun = subprocess.run(command, capture_output=True, timeout=240)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr).decode(errors="replace")[-6000:]
    resumed = _epochs(rep0)
    assert resumed == list(range(1, epochs + 1)), "resumed from the last finished epoch, none repeated"
    assert killed_at >= before
    assert _epochs(out / "stage1" / "rep01") == list(range(1, epochs + 1))
