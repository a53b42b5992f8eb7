"""TensorRT engine manifest checks and the engine predictor's refusals (no GPU needed).

The real build test runs only where TensorRT and a CUDA GPU are present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from lungseg import tensorrt_runtime
from lungseg.bundle import ENGINE_FP16, ENGINE_MANIFEST, ONNX_FP32, resolve_bundle, sha256_file
from lungseg.predictors import BackendUnavailableError, select_predictor
from lungseg.tensorrt_runtime import check_engine_manifest, load_engine_predictor, tensorrt_unavailable_reason

HERE = {"trt_version": "10.3.0", "gpu_name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7",
        "onnx_sha256": "a" * 64}


def manifest(**overrides: str) -> dict:
    base = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7",
            "onnx_sha256": "a" * 64, "precision": "fp16", "profile": {"min": 1, "opt": 1, "max": 8}}
    return {**base, **overrides}


def test_matching_manifest_has_no_reasons() -> None:
    assert check_engine_manifest(manifest(), **HERE) == []


@pytest.mark.parametrize(("field", "value"), [
    ("tensorrt_version", "10.0.1"),
    ("gpu_name", "NVIDIA A100-SXM4-80GB"),
    ("compute_capability", "8.0"),
    ("onnx_sha256", "b" * 64),
])
def test_each_mismatch_is_named(field: str, value: str) -> None:
    reasons = check_engine_manifest(manifest(**{field: value}), **HERE)
    assert len(reasons) == 1 and reasons[0].startswith(field) and value in reasons[0]


def test_missing_fields_wrong_precision_and_engine_hash_are_reported() -> None:
    broken = manifest(precision="int8")
    del broken["gpu_name"]
    reasons = check_engine_manifest(broken, **HERE, engine_sha256="c" * 64)
    assert any("lacks 'gpu_name'" in r for r in reasons)
    assert any("lacks 'engine_sha256'" in r for r in reasons)
    assert any("precision" in r for r in reasons)


@pytest.fixture
def engine_bundle(tmp_path: Path, tiny_onnx: Path) -> Path:
    """A bundle with a (fake) engine whose engine.json matches HERE except where a test tampers."""
    shutil.copy(tiny_onnx, tmp_path / ONNX_FP32)
    (tmp_path / ENGINE_FP16).write_bytes(b"not a real engine")
    recorded = manifest(onnx_sha256=sha256_file(tmp_path / ONNX_FP32),
                        engine_sha256=sha256_file(tmp_path / ENGINE_FP16), onnx_file=ONNX_FP32)
    (tmp_path / ENGINE_MANIFEST).write_text(json.dumps(recorded))
    return tmp_path


@pytest.fixture
def fake_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend TensorRT 10.3.0 (without a builder) and a Jetson Orin GPU are here."""
    monkeypatch.setattr(tensorrt_runtime, "import_tensorrt", lambda: SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(tensorrt_runtime, "cuda_device", lambda: ("NVIDIA Jetson AGX Orin", "8.7"))


def _tamper(bundle: Path, **fields: str) -> None:
    path = bundle / ENGINE_MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_tampered_manifest_is_refused_with_the_reason(engine_bundle: Path, fake_device: None) -> None:
    _tamper(engine_bundle, tensorrt_version="8.6.1", gpu_name="Tesla T4")
    with pytest.raises(BackendUnavailableError) as info:
        load_engine_predictor(resolve_bundle(engine_bundle), rebuild=False)
    assert "tensorrt_version" in str(info.value) and "Tesla T4" in str(info.value)


def test_changed_onnx_is_detected(engine_bundle: Path, fake_device: None) -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(engine_bundle / ONNX_FP32))
    model.doc_string = "re-exported"  # the engine no longer belongs to this ONNX file
    onnx.save(model, str(engine_bundle / ONNX_FP32))
    with pytest.raises(BackendUnavailableError, match="onnx_sha256"):
        load_engine_predictor(resolve_bundle(engine_bundle), rebuild=False)


def test_mismatch_that_cannot_be_rebuilt_is_refused_with_both_reasons(engine_bundle: Path,
                                                                      fake_device: None) -> None:
    _tamper(engine_bundle, compute_capability="7.2")
    with pytest.raises(BackendUnavailableError) as info:
        load_engine_predictor(resolve_bundle(engine_bundle))
    assert "compute_capability" in str(info.value) and "could not be rebuilt" in str(info.value)


def test_unreadable_manifest_is_refused(engine_bundle: Path, fake_device: None) -> None:
    (engine_bundle / ENGINE_MANIFEST).write_text("{ not json")
    with pytest.raises(BackendUnavailableError, match="not a readable engine manifest"):
        load_engine_predictor(resolve_bundle(engine_bundle))


def test_missing_engine_names_the_build_command(tiny_onnx: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_onnx, tmp_path / ONNX_FP32)
    with pytest.raises(BackendUnavailableError, match="lungseg-export --engine-only"):
        load_engine_predictor(resolve_bundle(tmp_path))


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT and a GPU are present")
def test_auto_backend_falls_back_to_cpu_with_the_reason(engine_bundle: Path) -> None:
    selection = select_predictor(resolve_bundle(engine_bundle), "auto")
    assert selection.predictor.backend == "cpu"
    assert selection.fallbacks[0].startswith("tensorrt: ")
    with pytest.raises(BackendUnavailableError):
        select_predictor(resolve_bundle(engine_bundle), "tensorrt")


@pytest.mark.skipif(tensorrt_unavailable_reason() is not None,
                    reason=f"needs TensorRT and a CUDA GPU: {tensorrt_unavailable_reason()}")
def test_engine_only_builds_a_working_engine(tmp_path: Path) -> None:
    from lungseg.export import cli
    from lungseg.export.checkpoint import random_checkpoint
    from lungseg.export.samples import load_samples, model_batch

    batch = model_batch(load_samples(None, with_masks=False))[0]
    random_checkpoint(tmp_path / "checkpoint.pt", init_features=4, centre_on=batch[:8])
    assert cli.main([str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path), "--fp16"]) == cli.EXIT_OK
    assert cli.main(["--engine-only", str(tmp_path)]) == cli.EXIT_OK
    recorded = json.loads((tmp_path / ENGINE_MANIFEST).read_text())
    assert recorded["precision"] == "fp16" and recorded["profile"]["max"] == 8
    predictor = load_engine_predictor(resolve_bundle(tmp_path), rebuild=False)
    assert predictor.predict(batch[:3]).shape == (3, 256, 256)
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert parity["models"][ENGINE_FP16]["passed"] is True
