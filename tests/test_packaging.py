"""The base install is the lean runtime: no torch, instant --help, one import namespace."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): tomli, a base dependency there
    import tomli as tomllib

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_base_dependencies_have_no_torch_and_extras_are_split():
    project = _pyproject()["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "torch" not in base and "tensorrt" not in base and "onnxruntime-gpu" not in base
    assert "onnxruntime" in base and "pydicom" in base and "highdicom" in base and "watchdog" in base
    extras = project["optional-dependencies"]
    assert any(d.startswith("torch") for d in extras["train"])
    assert any(d.startswith("tensorrt") for d in extras["gpu"])
    assert any(d.startswith("pytest") for d in extras["dev"])


def test_everything_installs_under_the_lungseg_namespace():
    tool = _pyproject()["tool"]["setuptools"]
    assert all(p == "lungseg" or p.startswith("lungseg.") for p in tool["packages"])
    assert set(tool["package-dir"]) == set(tool["packages"])


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT)


def test_runtime_help_works_without_torch():
    for module in ("lungseg.segment", "lungseg.edge_runtime.cli"):
        result = _run_blocked(f"from {module} import main; main(['--help'])")
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout


def test_segmenting_works_without_torch(tiny_onnx, fixture_manifest, tmp_path):
    from lungseg.data import load_manifest

    image = load_manifest(fixture_manifest)[0].image
    result = _run_blocked(
        "from lungseg.segment import main; "
        f"raise SystemExit(main([{str(image)!r}, '--model', {str(tiny_onnx)!r}, '--out', {str(tmp_path)!r}]))"
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"{image.stem}_mask.png").is_file()
    assert "torch" not in result.stderr


def test_the_wheel_ships_every_runtime_file_of_the_default_bundle(tracked_wheel):
    """Every file the shipped bundle's manifest lists is in the wheel (the OpenVINO IR was once left out, so a
    wheel install never ran OpenVINO), except the PyTorch checkpoint, which only training and export read."""
    import json
    import zipfile

    wheel = tracked_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    listed = json.loads((REPO_ROOT / "models" / "default" / "bundle.json").read_text())["files"]
    missing = [f for f in listed if f != "checkpoint.pt" and f"lungseg/models/default/{f}" not in names]
    assert missing == []
    assert "lungseg/models/default/checkpoint.pt" not in names
