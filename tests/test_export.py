"""lungseg-export: bundle contents, metadata, parity gates, int8, exit codes (tiny random U-Net)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
pytest.importorskip("onnx", reason="onnx (the [train] extra) is not installed")

from lungseg.bundle import ONNX_FP16, ONNX_FP32, ONNX_INT8, PARITY, sha256_file
from lungseg.export import cli
from lungseg.export.samples import load_samples, model_batch
from lungseg.nn.checkpoint import load_checkpoint, random_checkpoint
from lungseg.predictors import OnnxRuntimePredictor
from lungseg.preprocess import PREPROCESSING_PARAMS
from lungseg.tensorrt_runtime import tensorrt_unavailable_reason

NO_TENSORRT = tensorrt_unavailable_reason()


def run_cli(*argv: str | Path) -> tuple[int, str, str]:
    """Run lungseg-export in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def fixture_batch() -> np.ndarray:
    return model_batch(load_samples(None, with_masks=False))[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, fixture_batch: np.ndarray) -> Path:
    """An untrained UNet(init_features=4) whose masks are large and mostly far from 0.5."""
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", init_features=4,
                             centre_on=fixture_batch[:8])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict:
    """One full export (fp32 + fp16 + int8) shared by the tests below.

    The int8 gate is lowered: static int8 of *untrained* weights is poor (activations are
    not normalised by trained BatchNorm statistics); a trained model is held to 0.99.
    """
    out = tmp_path_factory.mktemp("bundle")
    code, stdout, stderr = run_cli(checkpoint, "--out", out, "--fp16", "--int8", "--threads", "1",
                                   "--min-dice-reduced", "0.5", "--model-version", "7.7.7")
    return {"out": out, "code": code, "stdout": stdout, "stderr": stderr,
            "parity": json.loads((out / PARITY).read_text())}


def test_export_writes_a_bundle_that_passes_parity(exported: dict) -> None:
    out = exported["out"]
    assert exported["code"] == cli.EXIT_OK, exported["stderr"]
    for name in (ONNX_FP32, ONNX_FP16, ONNX_INT8, PARITY):
        assert (out / name).is_file(), name
    parity = exported["parity"]
    assert parity["passed"] is True
    assert parity["reference"] == "pytorch"
    assert parity["data"]["n_images"] >= 16
    fp32 = parity["models"][ONNX_FP32]
    assert fp32["dice_mean"] >= 0.999 and fp32["abs_diff_max"] < 1e-4
    for entry in parity["models"].values():
        assert {"dice_mean", "dice_min", "abs_diff_max", "abs_diff_median", "abs_diff_p99",
                "flip_fraction", "passed", "required_dice"} <= entry.keys()
    assert parity["models"][ONNX_FP16]["dice_mean"] >= 0.99
    assert "parity vs pytorch" in exported["stdout"]


def test_metadata_is_readable_with_onnxruntime(exported: dict, checkpoint: Path) -> None:
    import onnxruntime as ort

    from lungseg.bundle import BUNDLE_MANIFEST, resolve_bundle

    manifest = json.loads((exported["out"] / BUNDLE_MANIFEST).read_text())
    assert manifest["model_version"] == "7.7.7" and manifest["model_name"] == "lungseg-unet"
    assert resolve_bundle(exported["out"]).version == "7.7.7"

    for name, precision in ((ONNX_FP32, "fp32"), (ONNX_FP16, "fp16"), (ONNX_INT8, "int8")):
        session = ort.InferenceSession(str(exported["out"] / name), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        assert meta["precision"] == precision
        assert meta["model_name"] == "lungseg-unet"
        assert meta["model_version"] == "7.7.7"  # --model-version: one version for every model of the bundle
        assert meta["input_size"] == "256"
        assert json.loads(meta["preprocessing"]) == json.loads(json.dumps(PREPROCESSING_PARAMS))
        assert meta["threshold"] == "0.5"
        assert meta["checkpoint_sha256"] == sha256_file(checkpoint)
        assert "dynamo=False" in meta["exporter"] and meta["opset"] == "17"
        assert meta["created"]


def test_every_model_has_the_io_contract_and_a_dynamic_batch(exported: dict, fixture_batch: np.ndarray) -> None:
    import onnxruntime as ort

    for name in (ONNX_FP32, ONNX_FP16, ONNX_INT8):
        session = ort.InferenceSession(str(exported["out"] / name), providers=["CPUExecutionProvider"])
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        assert (inp.name, inp.type, inp.shape) == ("image", "tensor(float)", ["batch", 3, 256, 256])
        assert (out.name, out.type, out.shape) == ("probability", "tensor(float)", ["batch", 1, 256, 256])
        result = session.run(None, {"image": fixture_batch[:3]})[0]
        assert result.shape == (3, 1, 256, 256) and result.dtype == np.float32


def test_int8_runs_and_its_dice_against_fp32_is_reported(exported: dict, fixture_batch: np.ndarray) -> None:
    entry = exported["parity"]["models"][ONNX_INT8]
    assert entry["precision"] == "int8" and entry["quantization"]["quant_format"] == "qdq"
    assert entry["quantization"]["per_channel"] is True
    assert entry["speed"]["speedup"] > 0 and entry["speed"]["target"] == 1.8 and entry["speed"]["batch"] == 4
    fp32 = OnnxRuntimePredictor(str(exported["out"] / ONNX_FP32)).predict(fixture_batch) >= 0.5
    int8 = OnnxRuntimePredictor(str(exported["out"] / ONNX_INT8)).predict(fixture_batch) >= 0.5
    dice = 2 * np.count_nonzero(fp32 & int8) / (np.count_nonzero(fp32) + np.count_nonzero(int8))
    print(f"int8 vs fp32 mask Dice {dice:.5f}; vs PyTorch mean {entry['dice_mean']:.5f} "
          f"min {entry['dice_min']:.5f}; speedup {entry['speed']['speedup']:.2f}x (tiny model)")
    assert dice > 0.5
    assert "int8 vs fp32 on CPU" in exported["stdout"]


@pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT and a GPU are present: the engine gets built")
def test_fp16_without_tensorrt_prints_one_line_and_succeeds(exported: dict) -> None:
    lines = [line for line in exported["stderr"].splitlines() if line.startswith("engine not built")]
    assert len(lines) == 1
    assert NO_TENSORRT in lines[0] and f"lungseg-export --engine-only {exported['out']}" in lines[0]
    assert exported["parity"]["engine"] == {"requested": True, "built": False, "reason": NO_TENSORRT}


def test_impossible_threshold_fails_with_exit_1_and_says_so_in_parity_json(checkpoint: Path, tmp_path: Path) -> None:
    code, stdout, _ = run_cli(checkpoint, "--out", tmp_path, "--min-dice-fp32", "1.01")
    assert code == cli.EXIT_PARITY_FAILED
    parity = json.loads((tmp_path / PARITY).read_text())
    assert parity["passed"] is False and parity["models"][ONNX_FP32]["passed"] is False
    assert "FAILED" in stdout


def test_reexport_removes_variants_of_the_earlier_export(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / ONNX_INT8).write_bytes(b"stale")
    code, _, _ = run_cli(checkpoint, "--out", tmp_path)
    assert code == cli.EXIT_OK
    assert not (tmp_path / ONNX_INT8).exists()


def test_missing_checkpoint_exits_3_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    code, _, stderr = run_cli(missing, "--out", tmp_path / "b")
    assert code == cli.EXIT_CHECKPOINT
    assert str(missing) in stderr and "not found" in stderr


def test_corrupt_checkpoint_exits_3_naming_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file")
    code, _, stderr = run_cli(corrupt, "--out", tmp_path / "b")
    assert code == cli.EXIT_CHECKPOINT
    assert str(corrupt) in stderr and "not a readable PyTorch checkpoint" in stderr


def test_bare_state_dict_loads_and_init_features_is_inferred(tmp_path: Path) -> None:
    import torch

    from lungseg.nn.unet import UNet

    path = tmp_path / "bare.pt"
    torch.save(UNet(init_features=2).state_dict(), path)
    loaded = load_checkpoint(path)
    assert loaded.init_features == 2 and loaded.model_version == "unknown"


def test_usage_errors_exit_2(tmp_path: Path, checkpoint: Path) -> None:
    assert run_cli(checkpoint)[0] == cli.EXIT_USAGE  # no --out
    assert run_cli(checkpoint, "--out", tmp_path, "--profile", "8,1,1")[0] == cli.EXIT_USAGE
    few = tmp_path / "few"
    few.mkdir()
    code, _, stderr = run_cli(checkpoint, "--out", tmp_path / "b", "--parity-data", few)
    assert code == cli.EXIT_USAGE and "no radiographs" in stderr


@pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT and a GPU are present")
def test_engine_requested_explicitly_but_impossible_exits_4(checkpoint: Path, exported: dict, tmp_path: Path) -> None:
    code, _, stderr = run_cli(checkpoint, "--out", tmp_path, "--engine")
    assert code == cli.EXIT_ENGINE_IMPOSSIBLE and "engine not built" in stderr
    code, _, stderr = run_cli("--engine-only", exported["out"])
    assert code == cli.EXIT_ENGINE_IMPOSSIBLE and "engine not built" in stderr


@pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT and a GPU are present")
def test_engine_only_needs_neither_torch_nor_onnx(exported: dict) -> None:
    """The on-device path imports no training dependencies: without TensorRT it just exits 4."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
            f"from lungseg.export import cli; sys.exit(cli.main(['--engine-only', {str(exported['out'])!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == cli.EXIT_ENGINE_IMPOSSIBLE, proc.stderr
    assert proc.stderr.count("engine not built") == 1


@pytest.mark.parametrize("module", ["lungseg.export.cli", "lungseg.benchmarks.cli"])
def test_help_imports_nothing_heavy(module: str) -> None:
    code = (f"import sys; from {module} import build_parser; build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'numpy') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
