"""Config file + flags, ledger idempotency, sidecar areas, exit codes, CLI helpers of lungseg-edge."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from edge_helpers import REPO_ROOT, file_ref, make_cr, run_once, save, sc_files, sidecars

UID = "1.2.826.0.1.3680043.10.1082.33."


def test_toml_config_with_flag_overrides(tmp_path: Path) -> None:
    from lungseg.edge_runtime.cli import build_parser, config_from_args

    config_file = tmp_path / "etc" / "edge.toml"
    config_file.parent.mkdir()
    config_file.write_text(
        'watch = "../incoming"\nout = "/srv/out"\nbackend = "cpu"\nseg = true\npolling = true\n'
        'batch_size = 8\nignore = ["*.part"]\n[edge]\nstable_seconds = 5\n'
    )
    args = build_parser().parse_args(["run", "--config", str(config_file), "--batch-size", "2", "--no-seg",
                                      "--out", str(tmp_path / "o")])
    config = config_from_args(args)
    assert config.watch == config_file.parent / "../incoming"  # relative to the config file
    assert config.out == tmp_path / "o"  # flag beats file
    assert (config.batch_size, config.seg, config.polling, config.backend) == (2, False, True, "cpu")
    assert config.stable_seconds == 5.0 and config.ignore == ["*.part"]
    assert config.quarantine_dir == tmp_path / "o" / "quarantine"
    assert config.state_dir == tmp_path / "o" / ".lungseg-state"


@pytest.mark.parametrize("body", ['batch_sise = 3\nwatch="w"\nout="o"\n', 'watch="w"\nout="o"\nseg = "yes"\n',
                                  'watch="w"\nout="o"\nbackend = "gpu"\n', "watch = [\n"])
def test_bad_config_is_a_usage_error(tmp_path: Path, body: str) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text(body)
    result = subprocess.run([sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--config", str(config_file)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "configuration" in result.stderr


def test_help_is_instant_and_imports_nothing_heavy() -> None:
    code = ("import sys; from lungseg.edge_runtime import cli; cli.build_parser().format_help(); "
            "print([m for m in ('numpy', 'pydicom', 'highdicom', 'onnxruntime', 'cv2', 'torch', 'watchdog') "
            "if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--help"],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    for flag in ("--watch", "--out", "--state", "--config", "--backend", "--model", "--seg", "--once", "--polling",
                 "--quarantine-mode", "--log-json", "exit codes"):
        assert flag in help_text


def test_every_former_run_flag_still_exists() -> None:
    """The flags are generated from the settings' declaration now; none of the hand-written ones was lost."""
    from lungseg.edge_runtime.cli import build_parser

    former = ("watch", "out", "state", "backend", "model", "seg", "once", "polling", "poll_interval",
              "stable_seconds", "batch_size", "threads", "threshold", "quarantine_mode", "sc_syntax", "sc_max_side",
              "sc_verify", "decode_min_side", "postprocess_resolution", "forward_host", "forward_port", "forward_ae",
              "forward_calling_ae", "log_json", "log_uids", "verbose", "forward_retry_seconds", "scp_port", "scp_ae",
              "scp_bind", "scp_allow", "metrics_port", "metrics_bind", "health_stale_seconds", "gate",
              "auto_orient", "gate_correct_threshold", "gate_uncertain_threshold", "gate_mirror_threshold",
              "gate_refuse_threshold")
    args = build_parser().parse_args(["run"])
    assert set(former) <= set(vars(args)), set(former) - set(vars(args))
    assert build_parser().parse_args(["run", "-vv", "--no-seg"]).verbose == 2


def test_ledger_makes_reruns_and_duplicates_idempotent(tmp_path: Path, tiny_onnx: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from lungseg.edge_runtime.cli import main

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for i in range(3):
        save(make_cr(f"{UID}{i}", index=i, size=64), watch / f"{i}.dcm")
    assert run_once(watch, out, tiny_onnx) == 0
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".lungseg-state" not in p.parts}
    assert len(sc_files(out)) == 3

    shutil.copyfile(watch / "1.dcm", watch / "again.dcm")  # same bytes, new name
    dup = make_cr(f"{UID}2", index=5, size=64)  # same SOPInstanceUID, different pixels
    save(dup, watch / "changed.dcm")
    assert run_once(watch, out, tiny_onnx) == 0
    assert run_once(watch, out, tiny_onnx) == 0
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".lungseg-state" not in p.parts}
    assert after == first  # nothing rewritten, nothing added

    capsys.readouterr()
    assert main(["status", "--state", str(out / ".lungseg-state"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (counts["instances"], counts["done"], counts["duplicate"], counts["quarantined"]) == (3, 3, 2, 0)

    sc = sc_files(out)[0]
    png = tmp_path / "preview.png"
    assert main(["render", str(sc), "--out", str(png)]) == 0
    import cv2

    # the SC as it is: the 64 px image at full size, plus the strip below it that holds the text a
    # 64 px image has no room for
    assert cv2.imread(str(png)).shape == pydicom.dcmread(sc).pixel_array.shape
    assert cv2.imread(str(png)).shape[1] == 64


def test_sidecar_has_areas_only_with_usable_spacing(tmp_path: Path, tiny_onnx: Path) -> None:
    from lungseg.dicom_decode import read_dicom

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    cases = {
        "none.dcm": {},
        "zero.dcm": {"pixel_spacing": (0.0, 0.0)},
        "pixel.dcm": {"pixel_spacing": (0.15, 0.15)},
        "imager.dcm": {"imager_spacing": (0.2, 0.2), "magnification": 1.25},
    }
    for i, (name, spacing) in enumerate(cases.items()):
        save(make_cr(f"{UID}{100 + i}", index=i, size=96, **spacing), watch / name)
    assert run_once(watch, out, tiny_onnx, threshold=0.3) == 0
    refs = {file_ref(out / ".lungseg-state", watch, name): name for name in cases}
    by_file = {refs[s["source"]["file"]]: s for s in sidecars(out)}
    assert set(by_file) == set(cases)
    for name in ("none.dcm", "zero.dcm"):
        assert "lung_areas_cm2" not in by_file[name]
        assert by_file[name]["pixel_spacing_mm"] is None
        assert "lung_area_px" in by_file[name]
    for name, mm in (("pixel.dcm", 0.15), ("imager.dcm", 0.2 / 1.25)):
        sidecar = by_file[name]
        assert sidecar["pixel_spacing_mm"] == pytest.approx([mm, mm])
        assert read_dicom(watch / name).pixel_spacing_mm == pytest.approx((mm, mm))
        assert sidecar["lung_areas_cm2"]["total"] == pytest.approx(sidecar["lung_area_px"] * mm * mm / 100, abs=0.01)
    for sidecar in by_file.values():
        assert set(sidecar["qa"]) >= {"flags", "components", "lung_fraction"}
        assert sidecar["backend"] == "cpu" and sidecar["precision"] == "fp32"
        assert set(sidecar["timings_ms"]) >= {"decode", "preprocess", "infer", "postprocess", "write", "total"}


def test_startup_exit_codes(tmp_path: Path, tiny_onnx: Path) -> None:
    from lungseg.edge_runtime.config import EdgeConfig
    from lungseg.edge_runtime.daemon import EXIT_BACKEND, EXIT_NO_MODEL, EXIT_STATE, EXIT_USAGE, run
    from lungseg.edge_runtime.ledger import StateLock

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    base = {"watch": watch, "out": out, "once": True, "backend": "cpu", "model": tiny_onnx}
    assert run(EdgeConfig(**{**base, "model": tmp_path / "missing.onnx"})) == EXIT_NO_MODEL
    assert run(EdgeConfig(**{**base, "backend": "tensorrt"})) == EXIT_BACKEND  # a lone .onnx has no engine
    assert run(EdgeConfig(**{**base, "watch": tmp_path / "nowhere"})) == EXIT_USAGE
    lock = StateLock(out / ".lungseg-state").acquire()
    try:
        assert run(EdgeConfig(**base)) == EXIT_STATE  # another instance holds the state folder
    finally:
        lock.release()


def test_daemon_process_never_imports_torch(tmp_path: Path, tiny_onnx: Path) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    save(make_cr(UID + "900", size=64), watch / "a.dcm")
    code = (
        "import sys; from lungseg.edge_runtime.cli import main; "
        f"rc = main(['run', '--once', '--seg', '--watch', {str(watch)!r}, '--out', {str(out)!r}, "
        f"'--model', {str(tiny_onnx)!r}, '--backend', 'cpu']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(sc_files(out)) == 1


def test_packaged_config_and_unit_are_usable() -> None:
    from lungseg.edge_runtime.config import build_config, load_toml

    config = build_config(load_toml(REPO_ROOT / "packaging" / "lungseg-edge.toml"), {})
    assert config.seg and config.log_json and config.quarantine_mode == "copy"
    unit = (REPO_ROOT / "packaging" / "lungseg-edge.service").read_text()
    for directive in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes",
                      "ProtectSystem=strict", "ReadWritePaths=", "User=lungseg", "--config"):
        assert directive in unit
    assert (REPO_ROOT / "packaging" / "INSTALL.md").is_file()
