"""Repetitions as Ray tasks on a real local Ray instance (two workers, tiny data)."""

from __future__ import annotations

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


def _epochs(rep: Path) -> list[int]:
    log = rep / "log.jsonl"
    return [json.loads(x)["epoch"] for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []


def _command(manifest: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lungseg.train.cli", "stage1", "--data", str(manifest), "--out", str(out),
            "--repetitions", "2", "--max-epochs", str(epochs), *TINY, *extra]


@pytest.mark.slow
def test_two_workers_run_two_repetitions_in_parallel(tmp_path, fixture_manifest):
    out = tmp_path / "run"
    subprocess.run(_command(fixture_manifest, out, 3), check=True, capture_output=True, timeout=240)
    reps = [out / "stage1" / f"rep{i:02d}" for i in range(2)]
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
    assert 2 <= before < epochs, "the worker should be killed mid-run"
    os.kill(int((rep0 / "worker.pid").read_text()), signal.SIGKILL)
    assert proc.wait(timeout=180) != 0, "with no retries a lost worker fails the run"
    assert not (rep0 / "done.json").exists()
    killed_at = len(_epochs(rep0))

    subprocess.run(command, check=True, capture_output=True, timeout=240)
    resumed = _epochs(rep0)
    assert resumed == list(range(1, epochs + 1)), "resumed from the last finished epoch, none repeated"
    assert killed_at >= before
    assert _epochs(out / "stage1" / "rep01") == list(range(1, epochs + 1))
