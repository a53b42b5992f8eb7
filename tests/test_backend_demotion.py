"""Demotion at run time: a CUDA error moves the service to the next backend; no file is lost or quarantined.

The GPU is the in-process fake (tests/fakes_cuda.py + tests/fakes_tensorrt.py)
whose memory copies start failing mid-run, as when the GPU falls off the bus;
everything else (model, onnxruntime, DICOM, daemon) is real.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from edge_helpers import make_cr, save, sc_files, sidecars
from fakes_cuda import FakeCudaRuntime, cudaError_t
from fakes_cuda import install as install_cuda
from fakes_tensorrt import FakeTensorRT
from fakes_tensorrt import install as install_trt

from lungseg.bundle import resolve_bundle
from lungseg.predictors import BackendOptions, select_predictor
from lungseg.selftest import load_golden
from lungseg.tensorrt_runtime import ensure_engine


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeTensorRT:
    cuda = install_cuda(monkeypatch, FakeCudaRuntime())
    state = FakeTensorRT(version="8.6.1", cuda=cuda)
    install_trt(monkeypatch, state)
    monkeypatch.setenv("LUNGSEG_ENGINE_CACHE", str(tmp_path / "engines"))
    return state


def test_cuda_error_mid_run_demotes_and_the_batch_is_still_served(gpu: FakeTensorRT, selftest_bundle: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    bundle = resolve_bundle(selftest_bundle)
    golden = load_golden(selftest_bundle)
    predictor = select_predictor(bundle, "auto", threads=2).predictor
    changes: list[str] = []
    predictor.on_change(lambda p: changes.append(f"{p.backend}/{p.precision}"))
    assert predictor.backend == "tensorrt" and predictor.selftest["passed"]
    first = predictor.predict(golden.inputs[:2])
    gpu.cuda.fail("cudaMemcpyAsync", cudaError_t.cudaErrorLaunchFailure)
    with caplog.at_level(logging.ERROR, logger="lungseg.predictors"):
        second = predictor.predict(golden.inputs[:2])
    assert (predictor.backend, predictor.precision) == ("cpu", "int8") and changes == ["cpu/int8"]
    assert second.shape == first.shape and np.mean((second >= 0.5) == (first >= 0.5)) > 0.99
    [demotion] = predictor.status()["demotions"]
    assert demotion["from"] == "tensorrt" and "cudaErrorLaunchFailure" in demotion["reason"]
    assert demotion["skipped"][0].startswith("cuda: ")  # the CPU onnxruntime package has no CUDA provider
    assert any(getattr(r, "event", None) == "backend_demoted" for r in caplog.records)
    assert gpu.cuda.live_streams == set() and gpu.cuda.device == {}  # the dead engine's resources were released


def test_bad_input_is_not_blamed_on_the_backend(selftest_bundle: Path) -> None:
    predictor = select_predictor(resolve_bundle(selftest_bundle), "cpu", threads=2).predictor
    assert predictor.precision == "int8"
    with pytest.raises(ValueError, match="model input must be"):
        predictor.predict(np.zeros((1, 256, 256), np.float32))
    assert predictor.precision == "int8" and predictor.status()["demotions"] == []


def test_last_backend_failing_raises_instead_of_looping(gpu: FakeTensorRT, tiny_bundle: Path) -> None:
    predictor = select_predictor(resolve_bundle(tiny_bundle), "tensorrt").predictor
    gpu.cuda.fail("cudaMemcpyAsync", cudaError_t.cudaErrorIllegalAddress)
    with pytest.raises(Exception, match="cudaErrorIllegalAddress"):
        predictor.predict(load_golden(tiny_bundle).inputs[:1])


def test_daemon_keeps_going_on_the_next_backend_and_quarantines_nothing(gpu: FakeTensorRT, tiny_bundle: Path,
                                                                        tmp_path: Path) -> None:
    from lungseg.edge_runtime.config import EdgeConfig
    from lungseg.edge_runtime.daemon import run

    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    # as `lungseg-edge build-engine --state STATE` at install: the daemon finds it in <state>/engines
    ensure_engine(resolve_bundle(tiny_bundle), BackendOptions(engine_cache=state / "engines"))
    watch.mkdir()
    for i in range(4):
        save(make_cr(f"1.2.826.0.1.3680043.8.498.{i + 1}", index=i), watch / f"{i}.dcm")
    # start-up self-test: 1 upload + 1 download; first file: 2 more; the GPU dies on the next copy
    gpu.cuda.fail("cudaMemcpyAsync", cudaError_t.cudaErrorLaunchFailure, after=4)
    config = EdgeConfig(watch=watch, out=out, state=state, model=tiny_bundle, backend="auto", once=True,
                        batch_size=1, stable_seconds=0.0, settle_seconds=0.0,
                        quarantine_grace_seconds=0.0).validate()
    assert run(config) == 0
    cars = sidecars(out)
    assert len(cars) == 4 and len(sc_files(out)) == 4
    from lungseg.edge_runtime.ledger import Ledger

    ledger = Ledger(state, readonly=True)
    counts = ledger.counts()
    ledger.close()
    assert counts["quarantined"] == 0 and counts["done"] == 4
    backends = sorted(c["backend"] for c in cars)
    assert backends == ["cpu", "cpu", "cpu", "tensorrt"]
    demoted = [c for c in cars if c["backend"] == "cpu"]
    assert all(c["precision"] == "fp32" and c["model"]["file"] == "model.onnx" for c in demoted)  # no int8 here
    assert all(len(c["demotions"]) == 1 and c["demotions"][0]["from"] == "tensorrt" for c in demoted)
    status = json.loads((state / "backend.json").read_text())
    assert status["backend"] == "cpu" and "cudaErrorLaunchFailure" in status["demotions"][0]["reason"]
