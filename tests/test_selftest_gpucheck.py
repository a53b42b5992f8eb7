"""``python -m lungseg.benchmarks.gpu_selfcheck``: help, the no-GPU exit, and its checks against the fake runtime."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fakes_cuda import FakeCudaRuntime, cudaError_t
from fakes_cuda import install as install_cuda

from lungseg.benchmarks import gpu_selfcheck


def test_help_runs_without_cuda() -> None:
    done = subprocess.run([sys.executable, "-m", "lungseg.benchmarks.gpu_selfcheck", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "3 no CUDA" in done.stdout and "--out DIR" in done.stdout


def test_without_a_cuda_device_exits_3_and_says_why(tmp_path: Path) -> None:
    code = "import sys; sys.modules['cuda'] = None; from lungseg.benchmarks.gpu_selfcheck import main; " \
           f"sys.exit(main(['--out', {str(tmp_path)!r}]))"  # cuda-python made absent, as on a CPU-only machine
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    report = json.loads((tmp_path / "gpu_selfcheck.json").read_text())
    assert done.returncode == gpu_selfcheck.EXIT_NO_CUDA == report["exit_code"]
    assert "no CUDA device" in done.stderr and report["no_cuda"] and "cuda-python" in report["reason"]


def run_main(tmp_path: Path) -> tuple[int, dict, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = gpu_selfcheck.main(["--out", str(tmp_path)])
    return code, json.loads((tmp_path / "gpu_selfcheck.json").read_text()), err.getvalue()


def test_every_check_passes_on_a_working_runtime(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cuda = install_cuda(monkeypatch, FakeCudaRuntime())
    code, report, _ = run_main(tmp_path)
    assert code == 0 and report["passed"], report
    assert [c["name"] for c in report["checks"]] == ["roundtrip_profile_buffers", "stream_lifetime",
                                                     "absurd_device_allocation", "absurd_pinned_allocation",
                                                     "cuda_graph_capture", "repeated_setup_teardown"]
    assert report["device"]["sm_count"] == 16
    assert cuda.live_streams == set() and cuda.device == {} and cuda.pinned == {} and cuda.graphs == {}


def test_a_failing_copy_is_reported_not_crashed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cuda = install_cuda(monkeypatch, FakeCudaRuntime(memory_limit=1 << 62))
    cuda.fail("cudaMemcpyAsync", cudaError_t.cudaErrorIllegalAddress)
    code, report, stderr = run_main(tmp_path)
    failed = {c["name"]: c for c in report["checks"] if not c["passed"]}
    assert code == 1 and not report["passed"]
    assert "cudaErrorIllegalAddress" in failed["roundtrip_profile_buffers"]["error"]
    assert "FAIL roundtrip_profile_buffers" in stderr
    assert cuda.live_streams == set() and cuda.device == {}  # released even after the failure
