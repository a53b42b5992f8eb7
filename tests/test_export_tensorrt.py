"""TensorRT builder, engine cache, parity gate and runtime against faithful fakes of tensorrt and cuda-python.

The fakes (tests/fakes_tensorrt.py, tests/fakes_cuda.py) enforce the API contracts
the code depends on; the engine computes with the real onnxruntime on the bundle's
real model. A real TensorRT build runs only where TensorRT and a GPU exist.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from fakes_cuda import FakeCudaRuntime, Props, cudaError_t
from fakes_cuda import install as install_cuda
from fakes_tensorrt import FakeTensorRT
from fakes_tensorrt import install as install_trt

from lungseg.bundle import ENGINE_FILE, ENGINE_MANIFEST, LEGACY_ENGINE_FILE, ONNX_FP16, resolve_bundle
from lungseg.engine_cache import REFUSED, EngineCache
from lungseg.predictors import BackendOptions, BackendRuntimeError, BackendUnavailableError, select_predictor
from lungseg.selftest import load_golden
from lungseg.tensorrt_runtime import (
    TensorRTPredictor,
    ensure_engine,
    load_engine_predictor,
    tensorrt_unavailable_reason,
)


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Install fake cuda-python + TensorRT 8.6 (fp32 ONNX, weak typing); the engine cache goes to a temp folder."""
    cuda = install_cuda(monkeypatch, FakeCudaRuntime())
    state = FakeTensorRT(version="8.6.1", cuda=cuda)
    install_trt(monkeypatch, state)
    monkeypatch.setenv("LUNGSEG_ENGINE_CACHE", str(tmp_path / "engines"))
    return state


def use_version(monkeypatch: pytest.MonkeyPatch, state: FakeTensorRT, version: str) -> None:
    state.version = version
    install_trt(monkeypatch, state)


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path):
    """A read-only copy of the test bundle (as under ProtectSystem=strict)."""
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    for path in [dest, *dest.iterdir()]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield resolve_bundle(dest)
    for path in [dest, *dest.iterdir()]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def bundle_snapshot(root: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in root.iterdir()}


# --- builder: the API contracts of each TensorRT version ----------------------------------------------------------
def test_fake_enforces_explicit_batch_on_86(gpu: FakeTensorRT, monkeypatch: pytest.MonkeyPatch, bundle) -> None:
    use_version(monkeypatch, gpu, "8.6.1")
    import tensorrt as trt  # the 8.6 flavour

    logger = trt.Logger()
    network = trt.Builder(logger).create_network(0)  # what 0.1.0 did
    parser = trt.OnnxParser(network, logger)
    assert not parser.parse_from_file(str(bundle.onnx))
    assert "explicit batch" in parser.get_error(0)


@pytest.mark.parametrize(("version", "typing"), [("8.6.1", "weak"), ("10.3.0", "strong"), ("10.13.0", "strong")])
def test_builder_works_on_86_and_10x(gpu: FakeTensorRT, monkeypatch: pytest.MonkeyPatch, bundle, version: str,
                                     typing: str) -> None:
    use_version(monkeypatch, gpu, version)
    _, manifest, where = ensure_engine(bundle, BackendOptions())
    network = gpu.networks[-1]
    assert where == "built" and network.explicit_batch
    assert network.strongly_typed is (typing == "strong")
    assert manifest["typing"].startswith(typing) and manifest["parity"]["passed"]
    assert manifest["onnx_file"] == (ONNX_FP16 if typing == "strong" else "model.onnx")
    if typing == "weak":  # Sigmoid and the output layer pinned to fp32
        pinned = {layer.name for layer in network.layers if layer.precision_is_set}
        assert pinned == {"/Sigmoid"} and manifest["fp32_layers"] == ["/Sigmoid"]
    else:
        assert not any(layer.precision_is_set for layer in network.layers)
        assert gpu.monitor_events, "IProgressMonitor was not attached on 10.x"


def test_the_fake_parser_is_no_more_lenient_than_the_real_one(gpu: FakeTensorRT, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Not onnxruntime's leniency: TensorRT 8.6's ONNX parser stops at opset 17 (10.3: 20), and the fake imports
    only the operators it lists (a subset of the real parser's: it may refuse more, never less)."""
    onnx = pytest.importorskip("onnx", reason="onnx (the [train] extra) writes the test models")
    from conftest import FIXTURES

    model = onnx.load(str(FIXTURES / "tiny_model.onnx"))
    model.opset_import[0].version = 18  # Conv and Sigmoid are unchanged in 18: still a valid model
    onnx.save(model, str(tmp_path / "opset18.onnx"))
    custom = onnx.load(str(FIXTURES / "tiny_model.onnx"))
    custom.graph.node[-1].op_type = "HardSigmoid"  # a valid model with an operator outside the fake's list
    onnx.save(custom, str(tmp_path / "custom.onnx"))

    def parse(path: Path) -> tuple[bool, str]:
        import tensorrt as trt

        logger = trt.Logger()
        network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(str(path))
        return ok, "" if ok else parser.get_error(0)

    use_version(monkeypatch, gpu, "8.6.1")
    ok, error = parse(tmp_path / "opset18.onnx")
    assert not ok and "opsets up to 17" in error
    assert parse(FIXTURES / "tiny_model.onnx")[0]
    ok, error = parse(tmp_path / "custom.onnx")
    assert not ok and "No importer registered for op: HardSigmoid" in error
    use_version(monkeypatch, gpu, "10.3.0")
    assert parse(tmp_path / "opset18.onnx")[0]


def test_tensorrt_older_than_86_is_refused_plainly(gpu: FakeTensorRT, monkeypatch: pytest.MonkeyPatch,
                                                   bundle) -> None:
    use_version(monkeypatch, gpu, "8.5.2")
    with pytest.raises(BackendUnavailableError, match=r"older than 8\.6.*JetPack 5 is not supported"):
        load_engine_predictor(bundle)
    assert gpu.builds == 0


def test_dla_engines_are_static_and_report_their_layer_placement(gpu: FakeTensorRT, bundle,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The DLA runs static shapes only: the service's engine for dla_core is a one-image engine whose layers the
    DLA can run (logged), the runtime is told the core, and a batch is split to fit; a dynamic DLA profile is
    refused at build instead of silently running every layer on the GPU."""
    from lungseg.tensorrt_build import DLA_PROFILE, EngineBuildError, EngineSettings, parse_profile

    options = BackendOptions(dla_core=0)
    with caplog.at_level(logging.WARNING, logger="lungseg.tensorrt_build"):
        path, manifest, where = ensure_engine(bundle, options)
    assert where == "built" and manifest["profile"] == {"input": "image", "min": 1, "opt": 1, "max": 1} == dict(
        zip(("input", "min", "opt", "max"), ("image", *DLA_PROFILE), strict=True))
    header = json.loads(path.read_bytes().split(b"\n", 1)[1])
    assert header["dla"] == 0 and header["dla_layers"] == 2  # the fake's DLA runs 2 of its 3 layers
    assert any("2 of 3 layers run on the DLA" in r.getMessage() for r in caplog.records)
    predictor = load_engine_predictor(bundle, options)
    golden = load_golden(bundle.root)
    assert predictor.predict(golden.inputs[:3]).shape[0] == 3  # three one-image runs
    with pytest.raises(BackendUnavailableError, match="static shapes only"):
        ensure_engine(bundle, options, settings=EngineSettings(profile=(1, 1, 8), dla_core=0), force=True)
    with pytest.raises(ValueError, match="MIN must be 1"):
        parse_profile("2,4,8")
    assert EngineBuildError  # the build's own error type, wrapped for the chain


def test_the_dla_and_cuda_graph_settings_reach_the_backend_options(tmp_path: Path) -> None:
    from lungseg.edge_runtime.backend_status import backend_options
    from lungseg.edge_runtime.config import EdgeConfig, build_config, load_toml

    config_file = tmp_path / "edge.toml"
    config_file.write_text('watch = "w"\nout = "o"\ndla_core = 1\ncuda_graph = true\n')
    config = build_config(load_toml(config_file), {}).validate()
    options = backend_options(config)
    assert (options.dla_core, options.cuda_graph) == (1, True)
    defaults = backend_options(EdgeConfig(watch=tmp_path / "w", out=tmp_path / "o").validate())
    assert (defaults.dla_core, defaults.cuda_graph) == (None, False)


def test_build_failure_reason_reaches_the_error_and_logging(gpu: FakeTensorRT, bundle,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    gpu.fail_build = "Internal error: could not find any implementation for node /encoder1/Conv"
    with caplog.at_level(logging.ERROR, logger="lungseg.tensorrt"), pytest.raises(
            BackendUnavailableError, match="could not find any implementation for node"):
        ensure_engine(bundle, BackendOptions())
    assert any(r.name == "lungseg.tensorrt" and "implementation" in r.getMessage() for r in caplog.records)
    tried = len(gpu.networks)  # the failure is recorded: the next start does not build again...
    with pytest.raises(BackendUnavailableError, match=r"refused earlier.*build failed"):
        ensure_engine(bundle, BackendOptions())
    assert len(gpu.networks) == tried
    gpu.fail_build = None  # ...until build-engine --force
    assert ensure_engine(bundle, BackendOptions(), force=True)[2] == "built"


def test_an_engine_that_builds_but_will_not_load_is_recorded_not_rebuilt_at_every_start(gpu: FakeTensorRT,
                                                                                        bundle) -> None:
    gpu.context_fails = True  # built, but no execution context (e.g. out of GPU memory on a small Jetson)
    with pytest.raises(BackendUnavailableError, match="built but would not load"):
        ensure_engine(bundle, BackendOptions())
    assert gpu.builds == 2  # the fp16 engine, then its one fp32 rebuild
    records = [json.loads((f / REFUSED).read_text()) for f in EngineCache().root.iterdir() if (f / REFUSED).is_file()]
    assert sorted(r["details"]["stage"] for r in records) == ["load", "load"]
    with pytest.raises(BackendUnavailableError, match=r"refused earlier.*would not load"):
        ensure_engine(bundle, BackendOptions())
    assert gpu.builds == 2
    gpu.context_fails = False
    assert ensure_engine(bundle, BackendOptions(), force=True)[2] == "built"


# --- engine cache: exact device, never the bundle, lock, parity gate ----------------------------------------------
def test_engine_is_cached_in_the_state_dir_never_in_a_read_only_bundle(gpu: FakeTensorRT, bundle,
                                                                       tmp_path: Path) -> None:
    before = bundle_snapshot(bundle.root)
    first = ensure_engine(bundle, BackendOptions())
    second = ensure_engine(bundle, BackendOptions())
    assert (first[2], second[2]) == ("built", "cache") and gpu.builds == 1
    assert first[0].is_relative_to(tmp_path / "engines") and first[0] == second[0]
    assert bundle_snapshot(bundle.root) == before


def test_another_device_model_gets_its_own_engine(gpu: FakeTensorRT, bundle) -> None:
    agx, _, _ = ensure_engine(bundle, BackendOptions())
    gpu.cuda.props[0] = Props(name=b"NVIDIA Jetson AGX Orin", multiProcessorCount=8, totalGlobalMem=8 * 1024**3)
    nano, manifest, where = ensure_engine(bundle, BackendOptions())  # an Orin Nano also says "Orin", 8.7
    assert where == "built" and gpu.builds == 2 and nano.parent != agx.parent
    assert manifest["device"]["sm_count"] == 8


def test_engine_failing_parity_is_refused_recorded_and_never_used(gpu: FakeTensorRT, bundle,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    gpu.corrupt_output = True
    with caplog.at_level(logging.ERROR), pytest.raises(BackendUnavailableError, match="failed its parity check"):
        ensure_engine(bundle, BackendOptions())
    cache = EngineCache()
    folders = list(cache.root.iterdir())
    assert not list(cache.root.glob(f"*/{ENGINE_FILE}"))
    assert any((f / REFUSED).is_file() for f in folders)
    assert any("refused" in r.getMessage() for r in caplog.records)
    assert gpu.builds == 2  # the fp16 engine, then its one fp32 rebuild: both failed, both refused
    gpu.corrupt_output = False  # a later start does not rebuild every time: the refusals stand...
    with pytest.raises(BackendUnavailableError, match="refused earlier"):
        ensure_engine(bundle, BackendOptions())
    assert gpu.builds == 2
    path, _, where = ensure_engine(bundle, BackendOptions(), force=True)  # ...until build-engine --force
    assert where == "built" and path.is_file() and gpu.builds == 3


@pytest.mark.parametrize("version", ["8.6.1", "10.3.0"])
def test_an_fp16_engine_failing_parity_is_rebuilt_once_at_fp32(gpu: FakeTensorRT, monkeypatch: pytest.MonkeyPatch,
                                                               bundle, version: str) -> None:
    """fp16 engines that output NaN (reported on Orin) do not push the chain off the GPU: one fp32 rebuild (TF32
    off) serves, both attempts recorded, and the next start finds it without building."""
    use_version(monkeypatch, gpu, version)
    gpu.nan_fp16 = True
    path, manifest, where = ensure_engine(bundle, BackendOptions())
    assert where == "built" and gpu.builds == 2 and manifest["precision"] == "fp32"
    assert "fp16 engine failed its parity check" in manifest["fp16_attempt"] and manifest["parity"]["passed"]
    header = json.loads(path.read_bytes().split(b"\n", 1)[1])
    assert header["fp16"] is False and header["tf32"] is False
    assert any((f / REFUSED).is_file() for f in EngineCache().root.iterdir())  # the fp16 attempt, on record
    again, _, where = ensure_engine(bundle, BackendOptions())
    assert where == "cache" and again == path and gpu.builds == 2
    predictor = load_engine_predictor(bundle, BackendOptions())
    assert predictor.precision == "fp32"
    out = predictor.predict(load_golden(bundle.root).inputs[:2])
    assert np.isfinite(out).all()


def test_the_fp32_engine_is_not_called_fp16_and_an_older_cache_name_is_still_found(gpu: FakeTensorRT, bundle) -> None:
    gpu.nan_fp16 = True
    path, manifest, _ = ensure_engine(bundle, BackendOptions())
    assert path.name == ENGINE_FILE and "fp16" not in path.name and manifest["precision"] == "fp32"
    gpu.nan_fp16 = False
    fresh, _, _ = ensure_engine(bundle, BackendOptions(), force=True)  # an fp16 engine, same file name
    fresh.rename(fresh.with_name(LEGACY_ENGINE_FILE))  # as lungseg < 0.3 stored it
    found, _, where = ensure_engine(bundle, BackendOptions())
    assert where == "cache" and found.name == LEGACY_ENGINE_FILE and gpu.builds == 3


def test_an_exported_engine_that_fails_the_pytorch_comparison_is_not_shipped(gpu: FakeTensorRT, tiny_bundle: Path,
                                                                             tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lungseg.export.bundle_writer import _try_engine
    from lungseg.tensorrt_build import EngineSettings

    dest = tmp_path / "export"
    shutil.copytree(tiny_bundle, dest)

    class Checker:  # the export's checker: the engine's masks against PyTorch's on held-out images
        def __init__(self, passed: bool) -> None:
            self.passed = passed

        def check(self, name: str, predictor: object) -> SimpleNamespace:
            return SimpleNamespace(passed=self.passed, name=name)

    info, result = _try_engine(dest, Checker(False), EngineSettings())
    assert result is not None and not result.passed and info["shipped"] is False and "removed" in info["reason"]
    assert not (dest / ENGINE_FILE).exists() and not (dest / ENGINE_MANIFEST).exists()
    info, _ = _try_engine(dest, Checker(True), EngineSettings())
    assert info["shipped"] is True and (dest / ENGINE_FILE).is_file() and (dest / ENGINE_MANIFEST).is_file()


def test_auto_selection_falls_back_when_the_engine_fails_parity(gpu: FakeTensorRT, bundle) -> None:
    gpu.corrupt_output = True
    selection = select_predictor(bundle, "auto", threads=1)
    assert selection.predictor.backend == "cpu"
    assert selection.fallbacks[0].startswith("tensorrt: ") and "parity" in selection.fallbacks[0]
    with pytest.raises(BackendUnavailableError):
        select_predictor(bundle, "tensorrt")


def test_waiting_on_another_process_build_keeps_the_service_alive(gpu: FakeTensorRT, bundle, tmp_path: Path) -> None:
    """While another process holds the build lock, the waiting start calls the keep-alive (systemd's
    EXTEND_TIMEOUT) instead of blocking silently past the unit's start timeout."""
    import fcntl
    import time

    import tensorrt as trt

    from lungseg.tensorrt_build import EngineSettings
    from lungseg.tensorrt_runtime import cuda_device_identity, engine_key

    key, _, _ = engine_key(trt, bundle.root, EngineSettings(), cuda_device_identity())
    cache = EngineCache(tmp_path / "engines")
    cache.root.mkdir(parents=True)
    calls: list[str] = []
    with (cache.root / f"{key.folder_name()}.lock").open("a+") as other:  # the other process's lock
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)

        def wait() -> None:
            with cache.locked(key, calls.append, every=0.05):
                calls.append("got it")

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.4)
        assert waiter.is_alive() and len(calls) >= 3 and "got it" not in calls
        fcntl.flock(other.fileno(), fcntl.LOCK_UN)
        waiter.join(5)
    assert calls[-1] == "got it" and all("waiting for another process's TensorRT build" in c for c in calls[:-1])


def test_concurrent_starts_build_once_under_the_lock(gpu: FakeTensorRT, bundle) -> None:
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_engine(bundle, BackendOptions())[2]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gpu.builds == 1 and sorted(results) == ["built", "cache"]


def test_shipped_engine_is_used_only_with_the_exact_key_and_parity(gpu: FakeTensorRT, tiny_bundle: Path,
                                                                   tmp_path: Path) -> None:
    dest = tmp_path / "with-engine"
    shutil.copytree(tiny_bundle, dest)
    built, _, _ = ensure_engine(resolve_bundle(dest), BackendOptions())
    for name in (ENGINE_FILE, ENGINE_MANIFEST):
        shutil.copyfile(built.parent / name, dest / name)
    assert ensure_engine(resolve_bundle(dest), BackendOptions())[2] == "bundle"
    manifest = json.loads((dest / ENGINE_MANIFEST).read_text())
    manifest["parity"]["passed"] = False
    (dest / ENGINE_MANIFEST).write_text(json.dumps(manifest))
    assert ensure_engine(resolve_bundle(dest), BackendOptions())[2] == "cache"


# --- runtime: buffers from the profile, pinned memory, stream lifetime, graphs, errors -----------------------------
def test_predictor_buffers_follow_the_engine_profile_and_are_released(gpu: FakeTensorRT, bundle) -> None:
    predictor = load_engine_predictor(bundle)
    golden = load_golden(bundle.root)
    assert predictor.max_batch == 8 and predictor.input_shape == (3, 256, 256)
    assert sorted(len(b) for b in gpu.cuda.device.values()) == [8 * 256 * 256 * 4, 8 * 3 * 256 * 256 * 4]
    out = predictor.predict(np.concatenate([golden.inputs] * 3))  # 12 images: chunks of 8 and 4
    assert out.shape == (12, 256, 256)
    assert np.abs(out[:4] - golden.reference).max() < 2e-3 and np.array_equal(out[:4], out[8:])
    assert gpu.cuda.pageable_copies == 0 and len(gpu.cuda.live_streams) == 1
    predictor.close()
    assert gpu.cuda.live_streams == set() and gpu.cuda.device == {} and gpu.cuda.pinned == {}
    with pytest.raises(BackendRuntimeError, match="closed"):
        predictor.predict(golden.inputs)


def test_cuda_graph_replays_batch_one_exactly(gpu: FakeTensorRT, bundle) -> None:
    golden = load_golden(bundle.root)
    plain = load_engine_predictor(bundle)
    graphed = load_engine_predictor(bundle, BackendOptions(cuda_graph=True))
    replays = gpu.cuda.calls.get("graph_replays", 0)
    for i in range(2):
        assert np.array_equal(graphed.predict(golden.inputs[i:i + 1]), plain.predict(golden.inputs[i:i + 1]))
    assert gpu.cuda.calls["graph_replays"] == replays + 2
    assert np.array_equal(graphed.predict(golden.inputs[:3]), plain.predict(golden.inputs[:3]))  # batch 3: no graph
    graphs_before = len(gpu.cuda.graphs)
    assert np.array_equal(graphed.predict(golden.inputs[3:4]), plain.predict(golden.inputs[3:4]))  # re-captured
    assert gpu.cuda.calls["graph_replays"] == replays + 3 and len(gpu.cuda.graphs) == graphs_before
    graphed.close()
    plain.close()
    assert gpu.cuda.graphs == {} and gpu.cuda.live_streams == set()


def test_a_failed_cuda_graph_recapture_runs_without_the_graph_and_leaks_nothing(gpu: FakeTensorRT, bundle) -> None:
    golden = load_golden(bundle.root)
    plain = load_engine_predictor(bundle)
    graphed = load_engine_predictor(bundle, BackendOptions(cuda_graph=True))
    graphed.predict(golden.inputs[:3])  # another shape ran: the next batch of 1 captures again...
    gpu.cuda.fail("cudaStreamBeginCapture", cudaError_t.cudaErrorStreamCaptureUnsupported)  # ...and that fails
    replays = gpu.cuda.calls.get("graph_replays", 0)
    for i in range(2):  # served without the graph, not demoted
        assert np.array_equal(graphed.predict(golden.inputs[i:i + 1]), plain.predict(golden.inputs[i:i + 1]))
    assert gpu.cuda.calls.get("graph_replays", 0) == replays and graphed._graph_exec is None
    graphed.close()
    plain.close()
    assert gpu.cuda.graphs == {}


def test_a_missing_stream_synchronize_cannot_pass_unnoticed(gpu: FakeTensorRT, bundle,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Asynchronous work runs only at the stream's synchronize: a result read without one is not the model's."""
    golden = load_golden(bundle.root)
    predictor = load_engine_predictor(bundle)
    expected = predictor.predict(golden.inputs[:2])
    assert predictor._io is not None
    monkeypatch.setattr(predictor._io, "synchronize", lambda: None)  # what a forgotten cudaStreamSynchronize does
    assert not np.array_equal(predictor.predict(golden.inputs[2:4]), load_engine_predictor(bundle).predict(
        golden.inputs[2:4]))
    assert np.isfinite(expected).all()


def test_the_fake_refuses_what_cuda_and_tensorrt_refuse_during_a_capture(gpu: FakeTensorRT, bundle) -> None:
    """A capture before the context's first run, or a stream synchronize inside a capture, fail as they do for real."""
    import tensorrt as trt

    engine, _, _ = ensure_engine(bundle, BackendOptions())
    predictor = TensorRTPredictor(trt, engine.read_bytes(), model_path=str(engine))
    rt, stream = predictor._rt, predictor._io.stream
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    assert predictor._context.set_input_shape("image", (1, *predictor.input_shape))
    assert rt.cudaStreamBeginCapture(stream.raw, mode)[0] == 0
    assert predictor._context.execute_async_v3(stream.handle) is False  # no warm-up run before the capture
    assert rt.cudaStreamSynchronize(stream.raw)[0] == cudaError_t.cudaErrorStreamCaptureUnsupported
    assert rt.cudaStreamEndCapture(stream.raw)[0] == cudaError_t.cudaErrorStreamCaptureInvalidated
    predictor.close()


def test_missing_context_and_failed_allocation_are_unavailable_not_crashes(gpu: FakeTensorRT, bundle) -> None:
    engine, _, _ = ensure_engine(bundle, BackendOptions())
    import tensorrt as trt

    gpu.context_fails = True
    with pytest.raises(BackendUnavailableError, match="execution context"):
        TensorRTPredictor(trt, engine.read_bytes(), model_path=str(engine))
    gpu.context_fails = False
    gpu.cuda.fail("cudaMalloc", cudaError_t.cudaErrorMemoryAllocation, after=1)  # the second buffer fails
    with pytest.raises(BackendUnavailableError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        TensorRTPredictor(trt, engine.read_bytes(), model_path=str(engine))
    assert gpu.cuda.device == {} and gpu.cuda.live_streams == set() and gpu.cuda.pinned == {}


def test_cuda_error_while_running_is_a_backend_runtime_error(gpu: FakeTensorRT, bundle) -> None:
    predictor = load_engine_predictor(bundle)
    gpu.cuda.fail("cudaMemcpyAsync", cudaError_t.cudaErrorLaunchFailure)
    with pytest.raises(BackendRuntimeError, match="cudaMemcpyAsync failed: cudaErrorLaunchFailure"):
        predictor.predict(load_golden(bundle.root).inputs[:1])
    predictor.close()


def test_engine_from_another_tensorrt_is_rejected_by_deserialisation(gpu: FakeTensorRT, monkeypatch, bundle) -> None:
    engine, _, _ = ensure_engine(bundle, BackendOptions())
    use_version(monkeypatch, gpu, "8.6.2")
    import tensorrt as trt

    with pytest.raises(BackendUnavailableError, match=r"could not deserialise.*built with TensorRT 8\.6\.1"):
        TensorRTPredictor(trt, engine.read_bytes(), model_path=str(engine))
    assert ensure_engine(bundle, BackendOptions())[2] == "built"  # the key has the version: rebuilt, not reused


# --- command lines ------------------------------------------------------------------------------------------------
def run_main(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_build_engine_and_engine_only_write_to_the_state_folder(gpu: FakeTensorRT, bundle, tmp_path: Path) -> None:
    from lungseg.edge_runtime.cli import main as edge_main
    from lungseg.export.cli import main as export_main

    state = tmp_path / "state"
    code, out, err = run_main(edge_main, ["build-engine", "--model", str(bundle.root), "--state", str(state)])
    assert code == 0, err
    assert "engine ready (built)" in out and list(state.glob(f"engines/*/{ENGINE_FILE}"))
    code, out, err = run_main(export_main, ["--engine-only", str(bundle.root), "--state", str(state), "--json"])
    assert code == 0, err
    report = json.loads(out)
    assert report["source"] == "cache" and report["passed"] and gpu.builds == 1


def test_engine_only_without_tensorrt_exits_4(bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lungseg.export.cli import main as export_main

    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    code, _, err = run_main(export_main, ["--engine-only", str(bundle.root), "--state", str(tmp_path)])
    assert code == 4 and "tensorrt" in err and "build-engine" in err


@pytest.mark.skipif(os.environ.get("LUNGSEG_REAL_TENSORRT") != "1",
                    reason="a real TensorRT build needs TensorRT and an NVIDIA GPU (set LUNGSEG_REAL_TENSORRT=1)")
def test_real_tensorrt_build(selftest_bundle: Path, tmp_path: Path) -> None:
    from lungseg.edge_runtime.cli import main as edge_main

    code, out, err = run_main(edge_main, ["build-engine", "--model", str(selftest_bundle), "--state", str(tmp_path)])
    assert code == 0 and "engine ready" in out, err
    options = BackendOptions(engine_cache=tmp_path / "engines")
    predictor = load_engine_predictor(resolve_bundle(selftest_bundle), options)
    golden = load_golden(selftest_bundle)
    assert np.mean((predictor.predict(golden.inputs) >= 0.5) == (golden.reference >= 0.5)) > 0.99
    predictor.close()


def test_engine_build_calls_the_callers_keepalive(gpu: FakeTensorRT, bundle, tmp_path: Path) -> None:
    """The builder reports progress through the caller's callback (the edge passes systemd's EXTEND_TIMEOUT_USEC):
    the core's builder knows nothing of systemd."""
    calls: list[str] = []
    options = BackendOptions(engine_cache=tmp_path / "engines-keepalive", build_keepalive=calls.append)
    _, _, where = ensure_engine(bundle, options)
    assert where == "built"
    assert calls and all("TensorRT" in c for c in calls)


def test_a_failing_keepalive_never_fails_the_build(gpu: FakeTensorRT, bundle, tmp_path: Path) -> None:
    def broken(status: str) -> None:
        raise OSError("notify socket gone")

    options = BackendOptions(engine_cache=tmp_path / "engines-broken", build_keepalive=broken)
    assert ensure_engine(bundle, options)[2] == "built"


def test_bindings_without_the_front_end_give_no_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """tensorrt-cu12-bindings and -libs alone (the old [gpu] extra) provide no `import tensorrt`: the reason says which
    package is missing, and only the front-end makes TensorRT usable."""
    cuda = install_cuda(monkeypatch, FakeCudaRuntime())
    state = FakeTensorRT(version="10.3.0", cuda=cuda)
    install_trt(monkeypatch, state, front_end=False)
    with pytest.raises(ImportError):
        import tensorrt  # noqa: F401
    reason = tensorrt_unavailable_reason()
    assert reason is not None and "tensorrt-cu12 front-end" in reason and "import tensorrt" in reason
    install_trt(monkeypatch, state, front_end=True)
    assert tensorrt_unavailable_reason() is None


def test_one_process_wide_logger_keeps_the_reasons_of_later_objects(gpu: FakeTensorRT, bundle) -> None:
    """TensorRT keeps one logger per process (a second one is ignored): after a build, a Runtime's deserialisation
    error still reaches the reason, and only this Runtime's errors are in it."""
    engine, _, _ = ensure_engine(bundle, BackendOptions())  # a Builder: the process's logger is now set
    import tensorrt as trt

    with pytest.raises(BackendUnavailableError, match=r"could not deserialise.*magic tag mismatch") as first:
        TensorRTPredictor(trt, b"not an engine", model_path=str(engine))
    with pytest.raises(BackendUnavailableError, match=r"magic tag mismatch") as second:
        TensorRTPredictor(trt, b"still not an engine", model_path=str(engine))
    assert str(second.value).count("magic tag mismatch") == 1, "an earlier object's errors leaked into the reason"
    assert "no reason logged" not in str(first.value)
    assert gpu.ignored_loggers == 0, "a second TensorRT logger was made (TensorRT would ignore it)"


def test_export_help_states_the_parity_data_default_truthfully() -> None:
    """--parity-data: the fixtures exist only in a source checkout, and --engine-only uses the golden set alone."""
    from lungseg.export.cli import build_parser

    action = next(a for a in build_parser()._actions if "--parity-data" in a.option_strings)
    text = " ".join((action.help or "").split())
    assert action.default is None
    assert "source checkout" in text and "--engine-only" in text and "golden" in text, text


@pytest.mark.parametrize(("layout", "module"), [("12.6+", "cuda.bindings.runtime"),
                                                ("bindings", "cuda.bindings.runtime"),
                                                ("12.2-12.5", "cuda.cudart")])
def test_each_cuda_python_layout_runs_the_engine_through_its_own_module(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path, tiny_bundle: Path,
                                                                        layout: str, module: str) -> None:
    """cuda-python 12.6+ has both names (``cuda.cudart`` a deprecated shim): lungseg uses ``cuda.bindings.runtime``;
    12.2-12.5 has only ``cuda.cudart``. The fake installs each name as its own module object."""
    import sys

    cuda = install_cuda(monkeypatch, FakeCudaRuntime(), layout=layout)
    install_trt(monkeypatch, FakeTensorRT(version="10.3.0", cuda=cuda))
    monkeypatch.setenv("LUNGSEG_ENGINE_CACHE", str(tmp_path / "engines"))
    predictor = load_engine_predictor(resolve_bundle(tiny_bundle), BackendOptions())
    assert predictor._rt is sys.modules[module]
    assert predictor.predict(load_golden(tiny_bundle).inputs[:1]).shape[0] == 1
    predictor.close()


def test_no_cuda_python_at_all_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from lungseg.cuda_memory import CudaUnavailableError, import_cudart

    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(CudaUnavailableError, match=r"cuda-python is not installed.*<13"):
        import_cudart()


def test_an_engine_whose_io_is_not_float32_is_refused_with_its_reason(gpu: FakeTensorRT, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake's engine reports the I/O types the ONNX declares (not always FLOAT): an fp16-I/O model's engine is
    refused before any buffer is sized for float32."""
    onnx = pytest.importorskip("onnx", reason="onnx (the [train] extra) writes the test model")
    float16 = pytest.importorskip("onnxconverter_common.float16", reason="onnxconverter-common writes the fp16 model")
    from conftest import FIXTURES

    from lungseg.tensorrt_build import build_serialized, engine_settings

    model = float16.convert_float_to_float16(onnx.load(str(FIXTURES / "tiny_model.onnx")), keep_io_types=False)
    path = tmp_path / "fp16_io.onnx"
    onnx.save(model, str(path))
    use_version(monkeypatch, gpu, "10.3.0")
    import tensorrt as trt

    engine, _ = build_serialized(trt, path, "strong", engine_settings())
    with pytest.raises(BackendUnavailableError, match=r"expected float32 I/O"):
        TensorRTPredictor(trt, engine, model_path=str(path))
