"""Boot-time self-test: the bundle's golden set decides which backend/precision serves (real models, real ORT)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edge_helpers import make_cr, save, sidecars

from lungseg.bundle import BUNDLE_MANIFEST, GOLDEN, resolve_bundle
from lungseg.predictors import BackendUnavailableError, select_predictor
from lungseg.selftest import GoldenSetError, compare_masks, load_golden


@pytest.fixture(scope="module")
def broken_bundle(selftest_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from selftest_bundles import break_int8

    return break_int8(selftest_bundle, tmp_path_factory.mktemp("broken") / "bundle")


def test_golden_set_is_small_hashed_and_tamper_evident(selftest_bundle: Path, tmp_path: Path) -> None:
    golden = load_golden(selftest_bundle)
    assert golden.inputs.shape == (4, 3, 256, 256) and golden.reference.shape == (4, 256, 256)
    assert (selftest_bundle / GOLDEN).stat().st_size < 1_000_000
    manifest = json.loads((selftest_bundle / BUNDLE_MANIFEST).read_text())
    assert manifest["files"][GOLDEN]["sha256"] == golden.sha256
    copy = tmp_path / "bundle"
    shutil.copytree(selftest_bundle, copy)
    data = bytearray((copy / GOLDEN).read_bytes())
    data[-100] ^= 0xFF
    (copy / GOLDEN).write_bytes(bytes(data))
    with pytest.raises(GoldenSetError, match="sha256 differs"):
        load_golden(copy)


def test_compare_masks_needs_mean_and_worst_image() -> None:
    reference = np.zeros((3, 8, 8), np.float32)
    reference[:, 2:6, 2:6] = 1.0
    candidate = reference.copy()
    candidate[0] = 1.0 - candidate[0]  # one image inverted: mean 0.67, worst 0
    stats = compare_masks(reference, candidate, "int8")
    assert not stats["passed"] and stats["dice_min"] == 0.0
    assert compare_masks(reference, reference, "int8")["passed"]
    assert not compare_masks(reference, np.full_like(reference, np.nan), "fp32")["passed"]


def test_cpu_uses_int8_when_its_self_test_passes(selftest_bundle: Path) -> None:
    selection = select_predictor(resolve_bundle(selftest_bundle), "cpu", threads=2)
    status = selection.predictor.status()
    assert (status["backend"], status["precision"]) == ("cpu", "int8")
    assert status["selftest"]["passed"] and status["selftest"]["dice_mean"] >= 0.995
    assert status["selftest"]["dice_min"] >= 0.98 and status["remaining"] == ["cpu-fp32"]


def test_broken_int8_is_demoted_to_fp32_at_start_with_a_logged_reason(broken_bundle: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lungseg.predictors"):
        selection = select_predictor(resolve_bundle(broken_bundle), "cpu", threads=2)
    assert (selection.predictor.backend, selection.predictor.precision) == ("cpu", "fp32")
    assert selection.fallbacks and selection.fallbacks[0].startswith("cpu-int8: self-test failed")
    failed = [r for r in caplog.records if getattr(r, "event", None) == "selftest_failed"]
    assert failed and "masks differ from reference" in failed[0].getMessage()


def test_bundle_without_golden_set_runs_fp32_only(selftest_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "old-bundle"
    shutil.copytree(selftest_bundle, copy)
    (copy / GOLDEN).unlink()
    (copy / BUNDLE_MANIFEST).unlink()
    selection = select_predictor(resolve_bundle(copy), "cpu", threads=2)
    assert selection.predictor.precision == "fp32"
    assert "cannot be self-tested" in selection.fallbacks[0]
    assert "no golden set" in selection.predictor.status()["selftest"]["reason"]


def test_explicit_gpu_backend_that_cannot_run_is_an_error(selftest_bundle: Path) -> None:
    with pytest.raises(BackendUnavailableError):
        select_predictor(resolve_bundle(selftest_bundle), "cuda")


def test_daemon_reports_the_self_test_in_sidecar_state_and_status(broken_bundle: Path, tmp_path: Path) -> None:
    from lungseg.edge_runtime.config import EdgeConfig
    from lungseg.edge_runtime.daemon import run

    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    save(make_cr("1.2.826.0.1.3680043.8.498.1"), watch / "a.dcm")
    config = EdgeConfig(watch=watch, out=out, state=state, model=broken_bundle, backend="cpu", once=True,
                        stable_seconds=0.0, settle_seconds=0.0, quarantine_grace_seconds=0.0).validate()
    assert run(config) == 0
    [sidecar] = sidecars(out)
    assert (sidecar["backend"], sidecar["precision"]) == ("cpu", "fp32")
    assert sidecar["selftest"]["passed"] and sidecar["selftest"]["dice_mean"] == pytest.approx(1.0, abs=1e-3)
    assert sidecar["fallbacks"][0].startswith("cpu-int8: self-test failed") and sidecar["demotions"] == []
    status = subprocess.run([sys.executable, "-m", "lungseg.edge_runtime.cli", "status", "--state", str(state),
                             "--json"], capture_output=True, text=True, check=True)
    backend = json.loads(status.stdout)["backend"]
    assert backend["precision"] == "fp32" and backend["selftest"]["passed"]
    text = subprocess.run([sys.executable, "-m", "lungseg.edge_runtime.cli", "status", "--state", str(state)],
                          capture_output=True, text=True, check=True).stdout
    assert "backend:                cpu (fp32, model.onnx)" in text and "not used: cpu-int8: self-test failed" in text


def test_cpu_package_shadowing_the_gpu_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from lungseg import predictors

    versions = {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}
    monkeypatch.setattr(predictors, "_installed", versions.get)
    problem = predictors.cuda_provider_problem(["CPUExecutionProvider"])
    assert "both onnxruntime 1.32.0" in problem and "pip uninstall -y onnxruntime onnxruntime-gpu" in problem
    monkeypatch.setattr(predictors, "_installed", {"onnxruntime-gpu": "1.31.1"}.get)
    assert "CUDA/cuDNN libraries did not load" in predictors.cuda_provider_problem(["CPUExecutionProvider"])
    assert predictors.cuda_provider_problem(["CUDAExecutionProvider", "CPUExecutionProvider"]) is None


def test_cuda_listed_but_cudnn_missing_is_caught_by_the_session_not_the_provider_list(
        monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path) -> None:
    """onnxruntime lists CUDAExecutionProvider even when cuDNN is missing; only a session shows CUDA did not load.
    Before that session the pip wheels' CUDA/cuDNN libraries are preloaded (onnxruntime.preload_dlls)."""
    import inspect

    import onnxruntime as ort

    from lungseg.predictors import BackendUnavailableError, OnnxRuntimePredictor

    calls: list[dict[str, object]] = []
    real = ort.preload_dlls

    def preload_dlls(cuda: bool = True, cudnn: bool = True, msvc: bool = True, directory: object = None) -> None:
        calls.append({"cuda": cuda, "cudnn": cudnn})
        raise OSError("libcudnn.so.9: cannot open shared object file")  # the wheels are not installed here

    assert list(inspect.signature(real).parameters) == list(inspect.signature(preload_dlls).parameters)
    monkeypatch.setattr(ort, "preload_dlls", preload_dlls)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="CUDA provider failed to initialise"):
        OnnxRuntimePredictor(str(tiny_onnx), device="cuda")
    assert calls == [{"cuda": True, "cudnn": True}]


def test_daemon_options_put_engines_in_the_state_folder(tmp_path: Path) -> None:
    from lungseg.edge_runtime.backend_status import backend_options
    from lungseg.edge_runtime.config import EdgeConfig

    config = EdgeConfig(watch=tmp_path, out=tmp_path / "out", state=tmp_path / "state", threads=2)
    options = backend_options(config)
    assert options.engine_cache == tmp_path / "state" / "engines" and options.threads == 2
