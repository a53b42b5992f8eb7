"""Shared test fixtures: paths to the committed fixtures and the optional shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["loopback_guard"]  # the suite may only use loopback sockets (tests/loopback_guard.py)
REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
FIXTURE_MANIFEST = FIXTURES / "cxr" / "manifest.csv"
TINY_ONNX = FIXTURES / "tiny_model.onnx"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real data set beside the project; tests using it skip where it is absent."""
    if not (SHARED_DATA / "cxr" / "manifest.csv").is_file():
        pytest.skip(f"shared data set not present at ../shared/data (looked in {SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fixture_manifest() -> Path:
    return FIXTURE_MANIFEST


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with the runtime's I/O contract (the committed ``tests/fixtures/tiny_model.onnx``, made by
    ``tests/fixtures/make_tiny_onnx.py``): the edge tests need neither torch nor onnx. A copy, alone in its
    folder, so a test can neither change the committed file nor see other files as its bundle."""
    import shutil

    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    shutil.copyfile(TINY_ONNX, path)
    return path


@pytest.fixture(scope="session")
def selftest_bundle(request: pytest.FixtureRequest) -> Path:
    """A real bundle with int8, fp16 and a golden set (tests/selftest_bundles.py), cached across runs by model hash."""
    pytest.importorskip("onnx", reason="onnx (the [train] extra) is needed to quantise the int8 model")
    import shutil

    from selftest_bundles import build_bundle

    from lungseg.bundle import ONNX_FP32, default_bundle_dir, sha256_file

    key = sha256_file(default_bundle_dir() / ONNX_FP32)[:16]
    bundle = Path(request.config.cache.mkdir("lungseg-selftest-bundle")) / key
    if not (bundle / "bundle.json").is_file():  # bundle.json is written last: its presence means complete
        shutil.rmtree(bundle, ignore_errors=True)
        build_bundle(bundle, fp16=True)
    return bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained model with fp16 variant and golden set: fast in the fake TensorRT engine."""
    pytest.importorskip("torch", reason="torch (the [train] extra) is needed to export the test model")
    pytest.importorskip("onnx", reason="onnx (the [train] extra) is needed to export the test model")
    from selftest_bundles import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))


@pytest.fixture(scope="session")
def tracked_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from the git-tracked files alone (no build/ or egg-info of an editable install), as a
    release would be."""
    import shutil
    import subprocess
    import sys

    tracked = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True, check=False)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: the wheel is built from the tracked files")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "lungseg-source"
    for name in filter(None, tracked.stdout.decode().split("\0")):
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(root / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    [wheel] = (root / "dist").glob("lungseg-*.whl")
    return wheel
