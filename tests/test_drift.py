"""The drift monitor: descriptors, the PSI statistic and its thresholds, the bundle's reference (export step),
the edge's windows, site baseline, gauges, the ``lungseg-edge drift`` report, and the daemon feeding it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungseg import drift
from lungseg.bundle import BUNDLE_MANIFEST, verified_file, write_bundle_manifest
from lungseg.data import load_manifest

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST = FIXTURES / "cxr" / "manifest.csv"


def _rows(rng: np.random.Generator, n: int, shift: float = 0.0) -> list[dict[str, float]]:
    return [{"intensity_mean": float(v), "noise": float(w), "flagged": float(f)}
            for v, w, f in zip(rng.normal(0.5 + shift, 0.1, n), rng.gamma(2.0, 0.01, n), rng.random(n) < 0.1,
                               strict=True)]


def test_chi2_quantile_matches_tables() -> None:
    # 99.9th percentiles of chi-square with 9 and 1 degrees of freedom (standard tables: 27.877, 10.828)
    assert drift._chi2_quantile(9) == pytest.approx(27.877, rel=0.01)
    assert drift._chi2_quantile(1) == pytest.approx(10.828, rel=0.06)


def test_psi_quiet_on_the_same_distribution_and_alarms_on_a_shift() -> None:
    rng = np.random.default_rng(1)
    reference = drift.build_reference(_rows(rng, 2000), "synthetic")
    assert set(reference.descriptors) == {"intensity_mean", "noise", "flagged"}
    assert len(reference.descriptors["intensity_mean"].counts) == drift.BINS
    assert len(reference.descriptors["flagged"].counts) == 2  # a 0/1 descriptor: one edge
    same = [drift.compare(reference, _rows(rng, 50)) for _ in range(40)]
    assert sum(c.alarm for c in same if c) <= 1
    shifted = drift.compare(reference, _rows(rng, 50, shift=0.15))
    assert shifted is not None and shifted.alarm and shifted.psi["intensity_mean"] > shifted.threshold["noise"]
    assert shifted.ratios["intensity_mean"] > 2 * shifted.ratios["noise"]
    assert drift.compare(reference, _rows(rng, 5), min_images=20) is None


def test_threshold_falls_with_the_window_and_has_a_floor() -> None:
    binned = drift.fit_binned(np.linspace(0, 1, 1000))
    assert binned.threshold(25) > binned.threshold(100) > binned.threshold(400)
    assert binned.threshold(10**9) == drift.PSI_FLOOR


def test_describe_sees_contrast_noise_resolution_and_lungs() -> None:
    from lungseg.imaging import read_image

    record = load_manifest(MANIFEST)[0]
    pixels = read_image(record.image).pixels
    base = drift.describe(pixels, mask=np.ones((10, 10), bool), flagged=False)
    noisy = drift.describe(np.clip(pixels + np.random.default_rng(0).normal(0, 0.05, pixels.shape), 0, 1)
                           .astype(np.float32))
    bright = drift.describe(np.power(pixels, 0.5))
    half = drift.describe(cv2.resize(pixels, (pixels.shape[1] // 2, pixels.shape[0] // 2)))
    assert noisy["noise"] > 3 * base["noise"]
    assert bright["intensity_mean"] > base["intensity_mean"] + 0.05
    assert half["log2_long_side"] == pytest.approx(base["log2_long_side"] - 1, abs=0.02)
    assert base["lung_fraction"] == 1.0 and base["flagged"] == 0.0 and "lung_fraction" not in noisy
    with pytest.raises(ValueError, match="2-D"):
        drift.describe(np.zeros((2, 2, 3), np.float32))


def test_reference_round_trip_and_malformed_file_named(tmp_path: Path) -> None:
    reference = drift.build_reference(_rows(np.random.default_rng(2), 300), "synthetic")
    path = tmp_path / drift.REFERENCE_FILE
    reference.write(path)
    again = drift.Reference.read(path)
    assert again.descriptors == reference.descriptors and again.images == 300
    data = json.loads(path.read_text())
    data["descriptors"]["noise"]["counts"].pop()
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"drift_reference.json.*'noise'"):
        drift.Reference.read(path)


def _bundle_with_reference(tmp_path: Path, tiny_onnx: Path, rows: list[dict[str, float]] | None = None) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copyfile(tiny_onnx, bundle / "model.onnx")
    write_bundle_manifest(bundle, {"model_version": "0.0.1"})
    if rows is not None:
        drift.build_reference(rows, "test").write(bundle / drift.REFERENCE_FILE)
        write_bundle_manifest(bundle)
    return bundle


def test_export_step_adds_a_hashed_reference(tmp_path: Path, tiny_onnx: Path) -> None:
    pytest.importorskip("torch", reason="lungseg-export needs the [train] extra")
    from lungseg.export.cli import main

    bundle = _bundle_with_reference(tmp_path, tiny_onnx)
    assert main(["--drift-reference", str(MANIFEST), "--drift-only", "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / BUNDLE_MANIFEST).read_text())
    assert drift.REFERENCE_FILE in manifest["files"] and manifest["model_version"] == "0.0.1"
    assert manifest["drift_reference"]["images"] == len(load_manifest(MANIFEST))
    reference = drift.Reference.read(verified_file(bundle, drift.REFERENCE_FILE))
    assert "lung_fraction" in reference.descriptors and "flagged" not in reference.descriptors
    (bundle / drift.REFERENCE_FILE).write_text((bundle / drift.REFERENCE_FILE).read_text().replace("1", "2", 1))
    with pytest.raises(ValueError, match="sha256 differs"):
        verified_file(bundle, drift.REFERENCE_FILE)
    with pytest.raises(SystemExit):
        main(["--drift-only", "--out", str(bundle)])


def test_monitor_windows_site_baseline_gauges_and_reload(tmp_path: Path) -> None:
    from lungseg.edge_runtime import service_metrics
    from lungseg.edge_runtime.drift_monitor import DriftMonitor

    rng = np.random.default_rng(3)
    reference = drift.build_reference(_rows(rng, 1000), "synthetic")
    folder = tmp_path / "state" / "drift"
    service_metrics.enable()
    try:
        monitor = DriftMonitor(reference, folder, window=40, site_after=60)
        now = 1_000_000.0
        old = _rows(rng, 60, shift=0.3)  # the site differs from the training data from its first image
        for i, row in enumerate(old):
            monitor.observe(row, now=now - 2 * 86400 + i)
        assert monitor.site is not None and (folder / "site_reference.json").is_file()
        for i, row in enumerate(_rows(rng, 40, shift=0.3)):
            monitor.observe(row, now=now + i)
        result = monitor.comparisons(now + 100)
        assert result[("bundle", "count")].alarm  # type: ignore[union-attr]
        assert not result[("site", "count")].alarm  # type: ignore[union-attr]
        assert result[("bundle", "day")].n == 40  # type: ignore[union-attr]  # the older rows are > 24 h old
        text = service_metrics.render().decode()  # type: ignore[union-attr]
        assert 'lungseg_drift_score{reference="site",window="count"}' in text
        assert 'lungseg_drift_psi{descriptor="intensity_mean",reference="bundle",window="day"}' in text
        assert len([line for line in text.splitlines() if line.startswith("lungseg_drift_psi{")]) == 12
    finally:
        service_metrics.disable()
    again = DriftMonitor(reference, folder, window=40, site_after=60)
    assert again.seen == 100 and again.site is not None
    assert again.comparisons(now + 100)[("bundle", "count")].score == pytest.approx(  # type: ignore[union-attr]
        result[("bundle", "count")].score)  # type: ignore[union-attr]
    no_flags = drift.Reference({k: v for k, v in reference.descriptors.items() if k != "flagged"})
    site = no_flags.rebinned(old, "site")  # the flag rate is watched against the site's own baseline
    assert set(site.descriptors) == set(reference.descriptors) and site.images == 60
    assert site.descriptors["noise"].edges == reference.descriptors["noise"].edges
    rows = [json.loads(line) for line in (folder / "descriptors.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and set(rows[0]) == {"t", "intensity_mean", "noise", "flagged"}


def test_monitor_off_without_reference_said_once(tmp_path: Path, tiny_onnx: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from lungseg.edge_runtime import drift_monitor

    bundle = _bundle_with_reference(tmp_path, tiny_onnx)
    with caplog.at_level(logging.WARNING, logger="lungseg.edge.drift"):
        assert drift_monitor.start(bundle, tmp_path / "state", 100, 500) is None
        drift_monitor.observe(np.zeros((64, 64), np.float32), (64, 64), None, [])
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["drift monitor off: the bundle has no drift_reference.json (export it with "
                        "lungseg-export --drift-reference)"]
    assert not (tmp_path / "state" / "drift").exists()


def test_drift_report_text_json_png(tmp_path: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lungseg.edge_runtime.cli import main
    from lungseg.edge_runtime.drift_monitor import DriftMonitor

    rng = np.random.default_rng(4)
    bundle = _bundle_with_reference(tmp_path, tiny_onnx, _rows(rng, 1000))
    state = tmp_path / "state"
    assert main(["drift", "--state", str(state), "--model", str(bundle)]) == 5
    monitor = DriftMonitor(drift.Reference.read(bundle / drift.REFERENCE_FILE), state / "drift", 50, 0)
    for row in _rows(rng, 50):
        monitor.observe(row)
    capsys.readouterr()
    assert main(["drift", "--state", str(state), "--model", str(bundle), "--window", "50", "--site-after", "0"]) == 0
    assert "bundle/count" in capsys.readouterr().out
    for row in _rows(rng, 50, shift=0.2):
        monitor.observe(row)
    png = tmp_path / "drift.png"
    code = main(["drift", "--state", str(state), "--model", str(bundle), "--window", "50", "--site-after", "0",
                 "--json", "--png", str(png)])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["comparisons"]["bundle/count"]["alarm"] is True
    assert report["comparisons"]["site/count"] is None
    image = cv2.imread(str(png))
    assert image is not None and image.shape[0] >= 200 and len(np.unique(image.reshape(-1, 3), axis=0)) >= 3


def test_daemon_feeds_the_monitor(tmp_path: Path, tiny_onnx: Path) -> None:
    from edge_helpers import make_cr, run_once, save

    rows = drift.record_rows(load_manifest(MANIFEST))
    bundle = _bundle_with_reference(tmp_path, tiny_onnx, rows)
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for i in range(3):
        save(make_cr(f"1.2.826.0.1.3680043.8.498.{i + 1}", index=i), watch / f"img{i}.dcm")
    assert run_once(watch, out, bundle) == 0
    recorded = (out / ".lungseg-state" / "drift" / "descriptors.jsonl").read_text().splitlines()
    assert len(recorded) == 3
    row = json.loads(recorded[0])
    assert set(drift.DESCRIPTORS) <= set(row) and row["log2_long_side"] == pytest.approx(7.0)  # 128 x 128
    assert "1.2.826" not in "".join(recorded) and "img0" not in "".join(recorded)
