"""The OpenVINO CPU backend: chosen by measurement, pinned by a setting, demoted when its artefact is broken.

Real OpenVINO, real NNCF int8 (quantised here from the shipped model on committed fixtures, cached across
runs like the self-test bundle), real onnxruntime. Tests that run OpenVINO skip where the ``openvino``
package (the ``[openvino]`` extra) is not installed; the no-extra test hides it from a subprocess.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lungseg.bundle import ONNX_FP32, write_bundle_manifest
from lungseg.openvino_runtime import OPENVINO_INT8_BIN, OPENVINO_INT8_XML
from lungseg.predictors import (
    CPU_CHOICES,
    OPENVINO_DEVICE_CANDIDATES,
    BackendOptions,
    candidates,
    select_predictor,
)

HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino (the [openvino] extra) is not installed")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def openvino_bundle(selftest_bundle: Path, request: pytest.FixtureRequest) -> Path:
    """The self-test bundle plus an NNCF int8 IR calibrated on six fixtures outside the golden set."""
    if not HAVE_OPENVINO or importlib.util.find_spec("nncf") is None:
        pytest.skip("openvino and nncf (the [openvino] extra) are not installed")
    from selftest_bundles import GOLDEN_IDS, fixture_inputs

    from lungseg.export.openvino_int8 import quantize_openvino_int8

    bundle = Path(request.config.cache.mkdir("lungseg-openvino-bundle")) / selftest_bundle.name
    if not (bundle / "bundle.json").is_file():
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(selftest_bundle, bundle, ignore=shutil.ignore_patterns("bundle.json"))
        ids, batch = fixture_inputs()
        calibration = [i for i, name in enumerate(ids) if name not in GOLDEN_IDS][:6]
        quantize_openvino_int8(bundle / ONNX_FP32, bundle, batch[calibration])
        write_bundle_manifest(bundle)
    return bundle


def found_accelerators() -> set[str]:
    """The ``openvino-gpu`` / ``openvino-npu`` candidates this machine has (real OpenVINO; usually none)."""
    from lungseg.openvino_runtime import accelerator_devices

    found = accelerator_devices()
    return {name for name, device in OPENVINO_DEVICE_CANDIDATES.items() if device in found}


def corrupt_openvino(bundle: Path, dest: Path, *, rewrite_manifest: bool) -> Path:
    """Copy ``bundle`` with the OpenVINO weights file cut in half; ``rewrite_manifest`` hashes the broken file
    into ``bundle.json`` (a faulty export), else the file differs from its recorded sha256 (altered later)."""
    shutil.copytree(bundle, dest)
    weights = dest / OPENVINO_INT8_BIN
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if rewrite_manifest:
        write_bundle_manifest(dest)
    return dest


def test_without_the_extra_openvino_is_never_imported(selftest_bundle: Path, tmp_path: Path) -> None:
    """openvino hidden from the interpreter (as on an edge install without the extra): the onnxruntime chain,
    unchanged, and no openvino module loaded, even for a bundle that carries an OpenVINO artefact."""
    bundle = tmp_path / "bundle"
    shutil.copytree(selftest_bundle, bundle)
    (bundle / OPENVINO_INT8_XML).write_text("<net/>")  # present, so only the missing package keeps it out
    script = f"""
import importlib.abc, json, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "openvino" or name.startswith("openvino."):
            raise ModuleNotFoundError(name)  # what an interpreter without the package says
        return None
sys.meta_path.insert(0, Hide())
from lungseg.bundle import resolve_bundle
from lungseg.predictors import (
    CPU_CHOICES,
    OPENVINO_DEVICE_CANDIDATES,
    BackendOptions,
    candidates,
    select_predictor,
)
bundle = resolve_bundle({str(bundle)!r})
names = [n for n, _ in candidates(bundle, "auto", BackendOptions())]
chosen = select_predictor(bundle, "cpu", threads=2).predictor
print(json.dumps({{"names": names, "backend": chosen.backend, "precision": chosen.precision,
                  "choice": chosen.status()["choice"]["by"], "imported": "openvino" in sys.modules}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"names": ["tensorrt", "cuda", "cpu-int8", "cpu-fp32"], "backend": "cpu", "precision": "int8",
                   "choice": "chain order", "imported": False}


@needs_openvino
def test_a_bundle_without_openvino_export_keeps_the_onnxruntime_chain(selftest_bundle: Path) -> None:
    from lungseg.bundle import resolve_bundle

    bundle = resolve_bundle(selftest_bundle)
    assert [n for n, _ in candidates(bundle, "cpu", BackendOptions())] == ["cpu-int8", "cpu-fp32"]
    assert [n for n, _ in candidates(bundle, "openvino", BackendOptions())] == ["openvino-bf16", "openvino-fp32"]
    pinned = candidates(bundle, "auto", BackendOptions(cpu_choice="openvino-fp32"))
    assert [n for n, _ in pinned][2:] == ["openvino-fp32", "openvino-bf16", "cpu-int8", "cpu-fp32"]
    with pytest.raises(ValueError, match="cpu_choice"):
        candidates(bundle, "cpu", BackendOptions(cpu_choice="fast"))


@needs_openvino
def test_the_fastest_cpu_candidate_serves_and_why_is_recorded(openvino_bundle: Path, tmp_path: Path) -> None:
    from lungseg.bundle import resolve_bundle
    from lungseg.edge_runtime.backend_status import describe, read_backend_status, write_backend_status
    from lungseg.openvino_runtime import native_bf16

    bundle = resolve_bundle(openvino_bundle)
    options = BackendOptions(threads=2, engine_cache=tmp_path / "engines")
    predictor = select_predictor(bundle, "cpu", options=options).predictor
    choice = predictor.status()["choice"]
    timings = choice["ms_per_image_b1"]
    assert choice["by"] == "measurement" and choice["chosen"] == min(timings, key=timings.get)
    expected = {"openvino-int8", "openvino-fp32", "cpu-int8", "cpu-fp32"} | ({"openvino-bf16"} if native_bf16()
                                                                             else set()) | found_accelerators()
    assert set(timings) == expected and all(t > 0 for t in timings.values())
    assert predictor.current_name == choice["chosen"] and predictor.selftest["passed"]
    status = predictor.status()
    assert status["device"] == OPENVINO_DEVICE_CANDIDATES.get(choice["chosen"], "CPU")
    assert status["remaining"] == sorted(timings, key=timings.get)[1:]
    if predictor.backend == "openvino":
        assert status["isa"] and "FP32" in status["isa"]
    write_backend_status(tmp_path / "state", status)
    assert read_backend_status(tmp_path / "state")["choice"]["chosen"] == choice["chosen"]
    assert any(line.startswith("chosen by:") and choice["chosen"] in line for line in describe(status))
    # the next start on this box reuses the measurement: only the winner is self-tested
    again = select_predictor(bundle, "cpu", options=options).predictor
    assert again.status()["choice"]["by"] == "measurement (cached)"
    assert again.current_name == choice["chosen"] and [s["candidate"] for s in again.selftests] == [choice["chosen"]]


@needs_openvino
def test_the_service_serves_at_once_and_switches_to_the_fastest_after_measuring(openvino_bundle: Path,
                                                                                 tmp_path: Path) -> None:
    """First start on a box: ready with the chain's first candidate; the CPU candidates are measured on a
    thread; the next predict serves the fastest (listeners told, so outputs name it), kept for the next start."""
    from lungseg.bundle import resolve_bundle
    from lungseg.predictors import CPU_CANDIDATES, FallbackPredictor
    from lungseg.selftest import load_golden

    bundle = resolve_bundle(openvino_bundle)
    options = BackendOptions(threads=2, engine_cache=tmp_path / "engines", measure_in_background=True)
    selection = select_predictor(bundle, "cpu", options=options)
    predictor = selection.predictor
    assert predictor.choice["by"].startswith("chain order") and predictor.current_name == "openvino-int8"
    assert selection.seconds < 2.0  # ready without timing five candidates first
    assert predictor._measuring is not None
    predictor._measuring.join(120)
    golden = load_golden(openvino_bundle)
    predictor.predict(golden.inputs[:1])
    choice = predictor.choice
    timings = choice["ms_per_image_b1"]
    assert choice["by"] == "measurement (in the background)" and predictor.current_name == choice["chosen"]
    assert choice["chosen"] == min(timings, key=timings.get)
    assert [n for n, _ in predictor._pending] == sorted(timings, key=timings.get)[1:]
    assert select_predictor(bundle, "cpu", options=options).predictor.choice["by"] == "measurement (cached)"
    # a chain whose first candidate is the slowest: serving switches at the next predict, and says so
    slow_first = sorted(candidates(bundle, "cpu", BackendOptions(threads=2)), key=lambda c: c[0] != "cpu-fp32")
    fallback = FallbackPredictor(slow_first, bundle.root)
    assert fallback.current_name == "cpu-fp32"
    changes: list[str] = []
    fallback.on_change(lambda p: changes.append(p.current_name))
    fallback.measure_in_background([c for c in slow_first if c[0] in CPU_CANDIDATES], None).join(120)
    assert fallback.current_name == "cpu-fp32" and not changes  # nothing changes until the next predict
    out = fallback.predict(golden.inputs[:1])
    assert out.shape[0] == 1 and fallback.current_name == fallback.choice["chosen"]
    if fallback.current_name != "cpu-fp32":
        assert changes == [fallback.current_name]


@needs_openvino
def test_openvino_int8_passes_its_selftest_and_serves_when_pinned(openvino_bundle: Path) -> None:
    from lungseg.bundle import resolve_bundle
    from lungseg.selftest import load_golden

    predictor = select_predictor(resolve_bundle(openvino_bundle), "cpu",
                                 options=BackendOptions(threads=2, cpu_choice="openvino-int8")).predictor
    assert (predictor.backend, predictor.precision, predictor.current_name) == ("openvino", "int8", "openvino-int8")
    assert Path(predictor.model_path).name == OPENVINO_INT8_XML
    assert predictor.selftest["dice_mean"] >= 0.995 and predictor.selftest["n_images"] == 4
    golden = load_golden(openvino_bundle)
    out = predictor.predict(golden.inputs[:3])
    assert out.shape == (3, *golden.reference.shape[1:]) and out.dtype == np.float32


@needs_openvino
@pytest.mark.parametrize("rewrite_manifest", [True, False], ids=["faulty-export", "altered-after-export"])
def test_a_broken_openvino_artefact_is_demoted_at_start(openvino_bundle: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture,
                                                        rewrite_manifest: bool) -> None:
    from lungseg.bundle import resolve_bundle

    broken = corrupt_openvino(openvino_bundle, tmp_path / "broken", rewrite_manifest=rewrite_manifest)
    with caplog.at_level(logging.WARNING, logger="lungseg.predictors"):
        predictor = select_predictor(resolve_bundle(broken), "cpu",
                                     options=BackendOptions(threads=2, cpu_choice="chain")).predictor
    assert predictor.current_name != "openvino-int8" and predictor.selftest["passed"]
    [reason] = [f for f in predictor.fallbacks if f.startswith("openvino-int8: ")]
    assert ("sha256 differs" if not rewrite_manifest else "OpenVINO could not load it") in reason
    assert any("openvino-int8" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@needs_openvino
def test_openvino_failing_while_running_is_demoted(openvino_bundle: Path) -> None:
    from lungseg.bundle import resolve_bundle
    from lungseg.selftest import load_golden

    predictor = select_predictor(resolve_bundle(openvino_bundle), "cpu",
                                 options=BackendOptions(threads=2, cpu_choice="chain")).predictor
    assert predictor.current_name == "openvino-int8"
    predictor.current._request = None  # type: ignore[union-attr]  # the runtime lost its infer request
    out = predictor.predict(load_golden(openvino_bundle).inputs[:1])
    [demotion] = predictor.status()["demotions"]
    assert out.shape[0] == 1 and demotion["from"] == "openvino" and demotion["from_precision"] == "int8"
    assert "failed while running" in demotion["reason"] and predictor.current_name != "openvino-int8"


def test_calibration_shares_no_patient_with_the_parity_set(fixture_manifest: Path, tmp_path: Path) -> None:
    from lungseg.export.openvino_int8 import patient_disjoint_calibration

    rows = list(csv.DictReader(fixture_manifest.open()))
    for row in rows:
        row["image"] = str(fixture_manifest.parent / row["image"])
        row["mask"] = str(fixture_manifest.parent / row["mask"])
    rows[1]["patient_id"] = rows[0]["patient_id"]  # a second image of the parity patient
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    batch, ids = patient_disjoint_calibration(manifest, {rows[0]["id"]}, limit=len(rows))
    assert rows[0]["id"] not in ids and rows[1]["id"] not in ids and len(ids) == len(rows) - 2
    assert batch.shape[0] == len(ids)
    groups = {(r["view"], r["portable"]) for r in rows if r["id"] in ids[:4]}
    assert len(groups) == min(4, len({(r["view"], r["portable"]) for r in rows[2:]}))  # round-robin over groups


def test_the_cpu_backend_setting_reaches_the_backend_options(tmp_path: Path) -> None:
    from lungseg.edge_runtime.backend_status import backend_options
    from lungseg.edge_runtime.config import CPU_BACKEND_CHOICES, EdgeConfig

    assert CPU_BACKEND_CHOICES == CPU_CHOICES  # the edge's settings (import-free) name every candidate

    config = EdgeConfig(watch=tmp_path / "in", out=tmp_path / "out", cpu_backend="cpu-int8")
    assert backend_options(config).cpu_choice == "cpu-int8"
    assert backend_options(EdgeConfig(watch=tmp_path / "in", out=tmp_path / "out")).cpu_choice == "fastest"


@needs_openvino
@pytest.mark.performance
def test_start_up_to_ready_under_two_seconds_with_a_broken_artefact(openvino_bundle: Path, tmp_path: Path) -> None:
    """After the one-time measurement on this box, a start whose OpenVINO artefact is broken is ready < 2 s."""
    from lungseg.bundle import resolve_bundle

    options = BackendOptions(threads=2, engine_cache=tmp_path / "engines")
    select_predictor(resolve_bundle(openvino_bundle), "cpu", options=options)  # measures, keeps the ranking
    broken = corrupt_openvino(openvino_bundle, tmp_path / "broken", rewrite_manifest=False)
    start = time.perf_counter()
    predictor = select_predictor(resolve_bundle(broken), "cpu", options=options).predictor
    seconds = time.perf_counter() - start
    assert predictor.current_name != "openvino-int8" and predictor.selftest["passed"]
    assert seconds < 2.0, f"start-up took {seconds:.2f} s"


@needs_openvino
def test_bench_puts_every_cpu_backend_side_by_side(tiny_onnx: Path) -> None:
    from lungseg.benchmarks.backends import discover
    from lungseg.benchmarks.cpu_backends import compare_cpu, text_lines
    from lungseg.bundle import resolve_bundle
    from lungseg.openvino_runtime import native_bf16

    bundle = resolve_bundle(tiny_onnx)
    backends = discover(bundle, None, 1)
    batch = np.random.default_rng(0).normal(size=(3, 3, 256, 256)).astype(np.float32)
    result = compare_cpu(bundle, backends, batch, threads=1, rounds=2)
    rows = result["rows"]
    assert set(rows) == {"onnxruntime-cpu", "openvino-fp32"} | ({"openvino-bf16"} if native_bf16() else set())
    assert rows["onnxruntime-cpu"]["speedup_vs_ort_fp32"] == {"1": 1.0, "4": 1.0}
    assert rows["onnxruntime-cpu"]["dice_mean"] == 1.0 and "FP32" in rows["openvino-fp32"]["isa"]
    for row in rows.values():
        assert set(row["ms_per_image"]) == {"1", "4"} and all(t["rounds"] == 2 and 0 < t["min"] <= t["median"]
                                                               <= t["max"] for t in row["ms_per_image"].values())
    assert result["default_choice"]["candidate"] == "cpu-fp32"  # a bare ONNX: no OpenVINO export, the ORT chain
    floor = result["int8_floor"]
    assert floor["model_gmac"] == pytest.approx(256 * 256 * 3 * 81 / 1e9)  # the tiny model: one 9x9 conv, 3 -> 1
    for row in rows.values():  # each row's rate is the model's MACs over its own batch-1 time
        near = row["vs_int8_floor"]["1"]
        assert near["gmac_per_s"] == pytest.approx(floor["model_gmac"] / row["ms_per_image"]["1"]["median"] * 1000)
    lines = text_lines(result)
    assert all(sum(line.lstrip().startswith(name + " ") for line in lines) == 1 for name in rows)
    assert any(line.lstrip().startswith(f"int8 floor: {floor['floor_ms_per_image']:.1f} ms/image") for line in lines)


@needs_openvino
def test_accelerators_join_the_measured_candidates_only_where_openvino_finds_them(openvino_bundle: Path) -> None:
    from lungseg.bundle import resolve_bundle

    names = [n for n, _ in candidates(resolve_bundle(openvino_bundle), "cpu", BackendOptions())]
    assert {n for n in names if n in OPENVINO_DEVICE_CANDIDATES} == found_accelerators()
    assert names[0] == "openvino-int8" and names[-2:] == ["cpu-int8", "cpu-fp32"]


@needs_openvino
def test_the_static_batch_path_of_the_accelerators_matches_the_dynamic_one(openvino_bundle: Path) -> None:
    """Accelerators run a static batch of one, image by image; the same path on the real CPU plugin must give
    the dynamic-batch probabilities (the GPU/NPU plugins themselves run only where present, below)."""
    from lungseg.openvino_runtime import OpenVINOPredictor
    from lungseg.selftest import load_golden

    xml = openvino_bundle / OPENVINO_INT8_XML
    inputs = load_golden(openvino_bundle).inputs[:3]
    static = OpenVINOPredictor(xml, "int8", options=BackendOptions(threads=2), static_batch=True)
    dynamic = OpenVINOPredictor(xml, "int8", options=BackendOptions(threads=2))
    assert static.static_batch and not dynamic.static_batch
    assert static._compiled.input(0).get_partial_shape().is_static  # the compiled model is batch-1 static
    out = static.predict(inputs)
    assert out.shape == (3, *inputs.shape[2:]) and out.dtype == np.float32
    np.testing.assert_allclose(out, dynamic.predict(inputs), atol=1e-4)
    assert not np.allclose(out[0], out[1])  # each image its own output, not the first one repeated


@needs_openvino
@pytest.mark.parametrize("name", sorted(OPENVINO_DEVICE_CANDIDATES))
def test_a_pinned_accelerator_serves_where_found_and_says_what_openvino_lists_where_not(openvino_bundle: Path,
                                                                                      name: str) -> None:
    from lungseg.bundle import resolve_bundle
    from lungseg.edge_runtime.backend_status import describe

    device = OPENVINO_DEVICE_CANDIDATES[name]
    selection = select_predictor(resolve_bundle(openvino_bundle), "cpu",
                                 options=BackendOptions(threads=2, cpu_choice=name))
    predictor = selection.predictor
    if name in found_accelerators():  # an Intel GPU/NPU with its driver: the real plugin serves and passes
        status = predictor.status()
        assert (predictor.current_name, status["backend"], status["device"]) == (name, "openvino", device)
        assert f"openvino (int8 on {device}, {OPENVINO_INT8_XML})" in describe(status)[0]
        assert predictor.selftest["passed"] and predictor.selftest["n_images"] == 4
        return
    [reason] = [f for f in selection.fallbacks if f.startswith(f"{name}: ")]
    assert f"OpenVINO finds no {device} device here (it lists [" in reason and "'CPU'" in reason
    assert predictor.current_name != name and predictor.selftest["passed"]


def test_status_names_the_device_when_it_is_not_the_cpu() -> None:
    from lungseg.edge_runtime.backend_status import describe

    status = {"backend": "openvino", "precision": "int8", "model_file": OPENVINO_INT8_XML}
    assert describe({**status, "device": "NPU"})[0].endswith(f"openvino (int8 on NPU, {OPENVINO_INT8_XML})")
    assert describe({**status, "device": "CPU"})[0].endswith(f"openvino (int8, {OPENVINO_INT8_XML})")
