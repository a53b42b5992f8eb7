"""lungseg-bench on a tiny bundle made by lungseg-export: JSON, Markdown, plot, parity gate, e2e."""

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

from lungseg.benchmarks import cli
from lungseg.export import cli as export_cli
from lungseg.export.checkpoint import random_checkpoint
from lungseg.export.samples import SHARED_DICOM_DIR, load_samples, model_batch

FAST = ("-n", "4", "--threads", "1", "--batch-sizes", "1,2", "--repeats", "1", "--no-progress",
        "--min-dice-dicom", "0")  # a random 4-feature model: parity of its DICOM masks means little


def run_bench(*argv: str | Path) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle laid out like the shipped one: checkpoint.pt beside model.onnx (+ int8)."""
    root = tmp_path_factory.mktemp("bench-bundle")
    batch = model_batch(load_samples(None, with_masks=False, limit=8))[0]
    checkpoint = random_checkpoint(root / "checkpoint.pt", init_features=4, centre_on=batch)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = export_cli.main([str(checkpoint), "--out", str(root), "--int8", "--min-dice-reduced", "0",
                                "--threads", "1"])
    assert code == export_cli.EXIT_OK
    return root


def test_json_markdown_and_plot(bundle: Path, tmp_path: Path) -> None:
    paths = {"json": tmp_path / "bench.json", "markdown": tmp_path / "bench.md", "plot": tmp_path / "bench.png",
             "readme": tmp_path / "README.md"}
    paths["readme"].write_text("# x\n\n<!-- performance:start -->\nstale figures\n<!-- performance:end -->\ntail\n")
    code, stdout = run_bench("--model", bundle, *FAST, "--skip-e2e", "--min-dice-reduced", "0",
                             *(arg for kind, path in paths.items() for arg in (f"--{kind}", path)))
    assert code == cli.EXIT_OK, stdout
    result = json.loads(paths["json"].read_text())
    parity = result["parity"]
    assert parity["reference"] == "pytorch" and parity["with_truth"] is True
    cpu = parity["results"]["onnxruntime-cpu"]
    assert cpu["dice_mean"] >= 0.999 and cpu["passed"] is True
    assert {"dice_min", "abs_diff_max", "abs_diff_median", "abs_diff_p99", "flip_fraction"} <= cpu.keys()
    assert set(cpu["metrics"]) == {"ACC", "AUC", "DICE", "JACC", "PREC", "RECA", "F1", "SENS", "SPEC"}
    assert abs(cpu["metrics_delta_vs_reference"]["DICE"]) < 1e-3
    assert "onnxruntime-int8" in parity["results"]
    for backend in ("pytorch", "onnxruntime-cpu"):
        assert set(result["latency"]["batches"][backend]) == {"1", "2"}
        assert result["latency"]["batches"][backend]["1"]["p50_ms"] > 0
    dicom = result["dicom_path"]
    assert dicom["files"] and set(dicom["mask_parity"]["per_file"]) == set(dicom["files"])
    assert all(0.0 <= v["dice"] <= 1.0 for v in dicom["mask_parity"]["per_file"].values())
    assert dicom["stages"] == {"skipped": "--skip-e2e"}
    assert set(dicom["acceptance"]) == {"j2k_ratio", "uncompressed_ratio", "burst_speedup", "daemon_peak_rss_mib",
                                        "mask_dice_mean"}
    assert isinstance(result["machine"]["cpu_features"], list)
    assert f"[CPU: {' '.join(result['machine']['cpu_features']) or 'unknown'}]" in stdout
    readme = paths["readme"].read_text()
    assert "stale figures" not in readme and "Native-size mask" in readme and readme.endswith("tail\n")
    assert result["latency"]["memory"]["max_rss_mib"] > 0
    assert result["backends"]["onnxruntime-fp16"] == {
        "available": False, "reason": "bundle has no model.fp16.onnx (export it with lungseg-export)"}
    assert result["compute"]["init_features"] == 4 and result["compute"]["floor_ms_per_image"] > 0
    assert result["acceptance"]["ort_cpu_p50_ms"] > 0
    assert result["machine"]["cpu"] and "onnxruntime" in result["versions"]
    assert "## Parity vs pytorch" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== Parity vs pytorch" in stdout


@pytest.mark.parametrize("gate", ["--min-dice-fp32", "--min-dice-dicom"])
def test_missed_parity_gate_exits_1(bundle: Path, gate: str) -> None:
    code, stdout = run_bench("--model", bundle, *FAST, "--skip-e2e", gate, "1.01")
    assert code == cli.EXIT_PARITY_FAILED
    assert "native-size mask): FAILED" in stdout


def test_runtime_only_install_uses_onnxruntime_as_reference(bundle: Path, tmp_path: Path) -> None:
    """Without torch (an edge device), PyTorch is skipped with the reason and onnxruntime CPU is the reference."""
    report = tmp_path / "bench.json"
    args = ["--model", str(bundle), *FAST, "--skip-e2e", "--min-dice-reduced", "0", "--json", str(report)]
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
            f"from lungseg.benchmarks import cli; sys.exit(cli.main({args!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == cli.EXIT_OK, proc.stderr
    result = json.loads(report.read_text())
    assert result["backends"]["pytorch"]["available"] is False
    assert "torch is not installed" in result["backends"]["pytorch"]["reason"]
    assert result["parity"]["reference"] == "onnxruntime-cpu"
    assert "onnxruntime-int8" in result["parity"]["results"]
    assert "torch" in result["compute"]["skipped"]


def test_missing_model_exits_3(tmp_path: Path) -> None:
    assert run_bench("--model", tmp_path / "nothing", *FAST, "--skip-e2e")[0] == cli.EXIT_NO_MODEL


def test_unet_flops_match_the_published_architecture() -> None:
    import torch

    from lungseg.benchmarks.compute import count_conv_flops
    from lungseg.model import UNet

    with torch.device("meta"):
        model = UNet()
    counted = count_conv_flops(model)
    assert counted["parameters"] == 7_763_041
    assert counted["macs"] == 12_071_206_912  # 24.1 GFLOP per 256 x 256 image
    assert np.isclose(counted["gflops"], 24.14, atol=0.01)


def _burst_sources() -> list[Path]:
    files = sorted(SHARED_DICOM_DIR.glob("*.dcm")) if SHARED_DICOM_DIR.is_dir() else []
    if not files:
        with contextlib.suppress(ImportError):
            from lungseg.edge_runtime.samples import sample_files

            files = sample_files()
    return files[:1]


@pytest.mark.slow
def test_end_to_end_burst_through_lungseg_edge(bundle: Path, tmp_path: Path) -> None:
    from lungseg.benchmarks.end_to_end import edge_command, run_burst

    if edge_command() is None:
        pytest.skip("lungseg.edge_runtime.cli is not installed")
    sources = _burst_sources()
    if not sources:
        pytest.skip("no DICOM files: neither ../shared/data/dicom nor pydicom-data's RG1 samples")
    result = run_burst(sources, 2, bundle, tmp_path, threads=1)
    assert result["exit_code"] == 0, result.get("stderr_tail")
    assert result["written"] == 2 and result["missing"] == 0
    assert result["arrival_to_sc"]["p50_ms"] > 0 and result["files_per_s"] > 0
    assert result["sidecar_total"]["n"] == 2
    assert 50 < result["peak_rss_mib"] < 4096  # sampled from /proc while lungseg-edge ran


def test_dicom_stage_tables_compare_the_default_and_the_legacy_path(bundle: Path) -> None:
    """Both paths through real lungseg-edge runs; per-stage medians and the non-inference/inference ratio."""
    from lungseg.benchmarks.dicom_path import stage_comparison
    from lungseg.benchmarks.end_to_end import edge_command

    if edge_command() is None:
        pytest.skip("lungseg.edge_runtime.cli is not installed")
    sources = _burst_sources()
    if not sources:
        pytest.skip("no DICOM files: neither ../shared/data/dicom nor pydicom-data's RG1 samples")
    result = stage_comparison(sources, bundle, copies=1, threads=1)
    for label in ("default", "legacy"):
        assert result[label]["exit_code"] == 0, result[label].get("stderr_tail")
        row = result[label]["per_file"][sources[0].name]
        assert row["n"] == 1 and all(row["stages_ms"][s] > 0 for s in ("decode", "infer", "write"))
        assert row["ratio_non_inference_to_infer"] == pytest.approx(row["non_inference_ms"] / row["stages_ms"]["infer"])
        assert {"render", "sc_encode", "sc_verify", "publish"} <= set(row["write_parts_ms"])
