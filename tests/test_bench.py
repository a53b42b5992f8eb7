"""lungseg-bench on a tiny bundle made by lungseg-export: JSON, Markdown, plot, verdict and exit codes, e2e."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
pytest.importorskip("onnx", reason="onnx (the [train] extra) is not installed")

from lungseg.benchmarks import cli, progress, readme
from lungseg.benchmarks.acceptance import parse_bounds
from lungseg.benchmarks.dicom_samples import synthetic_dicom
from lungseg.export import cli as export_cli
from lungseg.export.samples import SHARED_DICOM_DIR, load_samples, model_batch
from lungseg.nn.checkpoint import random_checkpoint

# a random 4-feature model: parity of its DICOM masks means little, and its timings (one repeat on a shared
# machine) decide nothing, so the one performance row measured without lungseg-edge gets a bound that holds
# the random 4-feature test model's timings say nothing about speed: the speed rows' bounds are moved out of reach
# of noise (their CPU-family bounds are tested on their own, below)
LOOSE = ("--bound", "cpu_default_vs_fastest_b1=1000", "--bound", "cpu_default_over_ort_int8_b1=0")
FAST = ("-n", "4", "--threads", "1", "--batch-sizes", "1,2", "--repeats", "1", "--no-progress",
        "--min-dice-dicom", "0", "--bound", "ort_cpu_vs_pytorch_p50=1000", *LOOSE)
# a runtime-only install: torch, tqdm and onnx cannot be imported, then lungseg-bench runs as its entry point does
RUNTIME_ONLY = """
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "tqdm", "onnx", "openvino", "nncf"):  # extras, not the runtime
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: runtime-only install)", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
from lungseg.benchmarks.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_bench(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def small_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one small real-pixel DICOM: the DICOM path's mask parity in a second, not a minute."""
    folder = tmp_path_factory.mktemp("bench-dicom")
    pixels = load_samples(None, with_masks=False, limit=1)[0].pixels
    synthetic_dicom(pixels, folder / "small.dcm", rows=440, columns=400)
    return folder


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
    out = tmp_path / "bench-output"  # created by lungseg-bench
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    code, stdout, stderr = run_bench("--model", bundle, *FAST, "--skip-e2e", "--min-dice-reduced", "0",
                                     *(arg for kind, path in paths.items() for arg in (f"--{kind}", path)))
    assert code == cli.EXIT_OK, stdout + stderr
    result = json.loads(paths["json"].read_text())
    parity = result["parity"]
    assert parity["reference"] == "pytorch" and parity["with_truth"] is True
    assert result["reference"]["backend"] == "pytorch" and "eager PyTorch" in result["reference"]["description"]
    golden = parity["golden"]
    assert golden["source"] == "golden.npz" and golden["passed"] is True
    assert {"pytorch", "onnxruntime-cpu", "onnxruntime-int8"} <= set(golden["results"])
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
    rows = result["acceptance"]
    assert set(rows) == {"j2k_after_decode", "j2k_decode_vs_library", "uncompressed_vs_yardstick", "burst_speedup",
                         "daemon_peak_rss_mib", "mask_dice_mean", "ort_cpu_vs_pytorch_p50", "sc_off_vs_yardstick",
                         "cpu_default_vs_fastest_b1", "cpu_default_over_ort_int8_b1"}
    side = result["cpu_backends"]["rows"]
    fastest = rows["cpu_default_vs_fastest_b1"]
    b1 = {name: r["ms_per_image"]["1"]["median"] for name, r in side.items()}
    assert fastest["passed"] is True and fastest["bound"] == 1000
    assert fastest["value"] == pytest.approx(b1[fastest["chosen"]] / b1[fastest["fastest"]])
    over = rows["cpu_default_over_ort_int8_b1"]
    if importlib.util.find_spec("openvino") is not None:
        assert over["bound"] == 0 and over["value"] == pytest.approx(over["ort_int8_ms"] / over["chosen_ms"])
    else:
        assert over["passed"] is None and "openvino is not installed" in over["skipped"]
    assert rows["j2k_after_decode"] == {**rows["j2k_after_decode"], "passed": None, "skipped": "--skip-e2e"}
    assert dicom["yardstick_ms"] > 0  # the fp32 onnxruntime CPU inference of one image, timed in this run
    assert rows["ort_cpu_vs_pytorch_p50"]["passed"] is True and rows["ort_cpu_vs_pytorch_p50"]["bound"] == 1000
    assert result["verdict"] == {"passed": True, "parity_failed": [], "acceptance_failed": [], "exit_code": 0,
                                 "not_measured": dict.fromkeys(("j2k_after_decode", "j2k_decode_vs_library",
                                                                "uncompressed_vs_yardstick", "sc_off_vs_yardstick",
                                                                "burst_speedup", "daemon_peak_rss_mib"),
                                                               "--skip-e2e")}
    assert "verdict: PASSED" in stdout and "reference: pytorch: the checkpoint in eager PyTorch" in stdout
    assert "PASSED (exit 0); not measured: j2k_after_decode" in stderr
    assert isinstance(result["machine"]["cpu_features"], list)
    assert f"[CPU: {' '.join(result['machine']['cpu_features']) or 'unknown'}]" in stdout
    assert result["latency"]["memory"]["max_rss_mib"] > 0
    assert result["backends"]["onnxruntime-fp16"] == {
        "available": False, "reason": "bundle has no model.fp16.onnx (export it with lungseg-export)"}
    assert result["compute"]["init_features"] == 4 and result["compute"]["floor_ms_per_image"] > 0
    assert rows["ort_cpu_vs_pytorch_p50"]["ort_cpu_p50_ms"] > 0
    assert result["machine"]["cpu"] and "onnxruntime" in result["versions"]
    assert "## Parity vs pytorch" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== Parity vs pytorch" in stdout and "== Parity vs the bundle's golden set" in stdout

    # publishing is a separate step, from explicit paths: docs folder + README section citing the docs copy
    docs, readme_md = tmp_path / "repo" / "docs" / "benchmarks", tmp_path / "repo" / "README.md"
    readme_md.parent.mkdir()
    readme_md.write_text(f"# x\n\n{readme.START}\nstale figures\n{readme.END}\ntail\n")
    with contextlib.redirect_stdout(io.StringIO()):
        assert readme.main(["--json", str(paths["json"]), "--docs", str(docs), "--readme", str(readme_md)]) == 0
    text = readme_md.read_text()
    assert "stale figures" not in text and "Native-size mask" in text and text.endswith("tail\n")
    assert "Generated from `docs/benchmarks/cpu.json`" in text and "verdict: PASSED" in text
    assert json.loads((docs / "cpu.json").read_text()) == result
    assert (docs / "cpu.md").is_file() and (docs / "latency.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("gate", ["--min-dice-fp32", "--min-dice-dicom"])
def test_missed_parity_gate_exits_1(bundle: Path, small_dicom: Path, gate: str) -> None:
    code, stdout, stderr = run_bench("--model", bundle, *FAST, "--dicom", small_dicom, "--skip-e2e", gate, "1.01")
    assert code == cli.EXIT_PARITY_FAILED
    assert "verdict: FAILED (parity)" in stdout and "PASSED" not in stdout
    assert "FAILED (exit 1); parity failed: " in stderr


def test_altered_golden_set_fails_parity(bundle: Path, small_dicom: Path, tmp_path: Path) -> None:
    altered = tmp_path / "bundle"
    shutil.copytree(bundle, altered)
    with (altered / "golden.npz").open("ab") as golden:
        golden.write(b"\0")  # no longer the file bundle.json records
    code, stdout, stderr = run_bench("--model", altered, *FAST, "--dicom", small_dicom, "--skip-e2e",
                                     "--min-dice-reduced", "0")
    assert code == cli.EXIT_PARITY_FAILED, stdout + stderr
    assert "golden set: FAILED: golden.npz: sha256 differs" in stdout and "verdict: FAILED (parity)" in stdout


def test_failing_acceptance_row_exits_3_and_is_named(bundle: Path, small_dicom: Path, tmp_path: Path) -> None:
    """A bound no run can meet (onnxruntime taking no time at all): parity holds, the row fails, exit 3."""
    report = tmp_path / "bench.json"
    code, stdout, stderr = run_bench("--model", bundle, *FAST, "--dicom", small_dicom, "--skip-e2e",
                                     "--min-dice-reduced", "0", "--bound", "ort_cpu_vs_pytorch_p50=0",
                                     "--json", report)
    assert code == cli.EXIT_ACCEPTANCE_FAILED, stdout + stderr
    assert "PASSED" not in stdout
    assert "acceptance: FAILED: ort_cpu_vs_pytorch_p50 " in stdout and "(bound <= 0)" in stdout
    assert "verdict: FAILED (acceptance)" in stdout and "parity: passed" in stdout
    assert "FAILED (exit 3); acceptance rows failed: ort_cpu_vs_pytorch_p50" in stderr
    result = json.loads(report.read_text())
    assert result["passed"] is False and result["verdict"]["acceptance_failed"] == ["ort_cpu_vs_pytorch_p50"]
    assert result["verdict"]["exit_code"] == cli.EXIT_ACCEPTANCE_FAILED
    assert result["acceptance"]["ort_cpu_vs_pytorch_p50"]["passed"] is False


@pytest.mark.parametrize("bound", ["j2k_after_decode", "nonsense=1", "burst_speedup=fast"])
def test_bad_bound_is_a_usage_error(bound: str) -> None:
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()):
        cli.main(["--bound", bound])
    assert exit_info.value.code == cli.EXIT_USAGE


def test_crash_is_an_internal_error_not_a_verdict(bundle: Path, small_dicom: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A JSON path that is a folder: the run completes, writing its result crashes -> 70, never 0/1/3."""
    code, _, stderr = run_bench("--model", bundle, *FAST, "--dicom", small_dicom, "--skip-e2e",
                                "--min-dice-reduced", "0", "--json", tmp_path)
    assert code == cli.EXIT_INTERNAL
    assert "internal error (exit 70)" in stderr and "IsADirectoryError" in caplog.text


def test_runtime_only_install_checks_against_the_fp32_onnx_and_the_golden_set(bundle: Path, small_dicom: Path,
                                                                              tmp_path: Path) -> None:
    """Without torch, tqdm and onnx (an edge device): a verdict, against the fp32 ONNX and the golden set."""
    report = tmp_path / "bench.json"
    args = ["--model", bundle, "-n", "2", "--threads", "1", "--batch-sizes", "1", "--repeats", "1",
            "--dicom", small_dicom, "--skip-e2e", "--min-dice-dicom", "0", "--min-dice-reduced", "0", "--json", report,
            *LOOSE]
    proc = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == cli.EXIT_OK, proc.stdout + proc.stderr
    assert "reference: onnxruntime-cpu: the fp32 ONNX (model.onnx) on the CPU; no PyTorch reference" in proc.stdout
    assert "verdict: PASSED" in proc.stdout and "PASSED (exit 0)" in proc.stderr
    result = json.loads(report.read_text())
    assert result["backends"]["pytorch"]["available"] is False
    assert "torch is not installed" in result["backends"]["pytorch"]["reason"]
    assert result["reference"]["backend"] == result["parity"]["reference"] == "onnxruntime-cpu"
    assert "fp32 PyTorch probabilities" in result["reference"]["golden_set"]
    golden = result["parity"]["golden"]
    assert set(golden["results"]) == {"onnxruntime-cpu", "onnxruntime-int8"} and golden["passed"] is True
    assert golden["results"]["onnxruntime-cpu"]["dice_mean"] >= 0.999  # the fp32 ONNX against PyTorch's numbers
    assert "onnxruntime-int8" in result["parity"]["results"]
    assert "torch" in result["compute"]["skipped"]
    assert result["acceptance"]["ort_cpu_vs_pytorch_p50"]["passed"] is None
    assert "openvino is not installed" in result["acceptance"]["cpu_default_over_ort_int8_b1"]["skipped"]
    assert result["acceptance"]["cpu_default_vs_fastest_b1"]["value"] > 0  # the chain's choice, timed all the same
    assert result["verdict"]["exit_code"] == cli.EXIT_OK


def test_plain_progress_stands_in_for_tqdm() -> None:
    stream = io.StringIO()
    assert list(progress.track(["a", "b"], "parity", "backend", enabled=True, stream=stream)) == ["a", "b"]
    assert stream.getvalue() == "parity: 1/2 backend\nparity: 2/2 backend\n"
    assert list(progress.track(["a"], "parity", "backend", enabled=False, stream=stream)) == ["a"]


def test_missing_model_is_a_usage_error(tmp_path: Path) -> None:
    code, _, stderr = run_bench("--model", tmp_path / "nothing", *FAST, "--skip-e2e")
    assert code == cli.EXIT_USAGE and "nothing" in stderr


def test_unet_flops_match_the_published_architecture() -> None:
    import torch

    from lungseg.benchmarks.compute import count_conv_flops
    from lungseg.nn.unet import UNet

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
    off = result["sc_off"]  # the defaults without the SC: no SC stages, a SEG and an SR still written
    assert off["exit_code"] == 0, off.get("stderr_tail")
    parts = off["per_file"][sources[0].name]["write_parts_ms"]
    assert "sc_verify" not in parts and {"seg_encode", "sr_encode"} <= set(parts)


def _side_by_side(ort_int8_ms: float, chosen_ms: float, *, openvino: bool = True) -> dict[str, Any]:
    def timed(ms: float) -> dict[str, Any]:
        return {"ms_per_image": {"1": {"median": ms}}}

    return {"rows": {"onnxruntime-int8": {"candidate": "cpu-int8", **timed(ort_int8_ms)},
                     "openvino-int8": {"candidate": "openvino-int8", **timed(chosen_ms)}},
            "default_choice": {"candidate": "openvino-int8"}, "fastest_at_quality": "openvino-int8",
            "default_vs_fastest_b1": 1.0, "openvino_installed": openvino}


@pytest.mark.parametrize(("features", "family", "bound", "passed"), [
    (["avx2", "avx512_vnni", "amx_int8"], "amx_int8", 4.0, False),  # 1.45x on an AMX CPU misses its 4x
    (["avx2", "avx512_vnni"], "avx512_vnni", 1.5, False),
    (["avx2"], "other", 1.0, True),  # no slower anywhere
])
def test_the_speedup_over_onnxruntime_int8_is_held_to_the_cpu_family_bound(features: list[str], family: str,
                                                                          bound: float, passed: bool) -> None:
    from lungseg.benchmarks.acceptance import BOUNDS
    from lungseg.benchmarks.cpu_backends import acceptance_rows

    rows = acceptance_rows(_side_by_side(43.5, 30.0), dict(BOUNDS), features)
    over = rows["cpu_default_over_ort_int8_b1"]
    assert (over["cpu_family"], over["bound"], over["passed"]) == (family, bound, passed)
    assert over["value"] == pytest.approx(1.45) and rows["cpu_default_vs_fastest_b1"]["passed"] is True
    moved = acceptance_rows(_side_by_side(43.5, 30.0), parse_bounds(["cpu_default_over_ort_int8_b1=1.4"]), features)
    assert moved["cpu_default_over_ort_int8_b1"]["bound"] == 1.4  # --bound wins over the family's
    absent = acceptance_rows(_side_by_side(43.5, 43.5, openvino=False), dict(BOUNDS), features)
    assert absent["cpu_default_over_ort_int8_b1"]["passed"] is None  # not measured, never a pass
