"""Shared test fixtures: paths to the committed fixtures and the optional shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
FIXTURE_MANIFEST = FIXTURES / "cxr" / "manifest.csv"
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
    """A small random-weight U-Net exported to ONNX (needs torch; skipped without it)."""
    torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    from lungseg.model import UNet

    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    torch.manual_seed(0)
    model = UNet(init_features=4).eval()
    torch.onnx.export(
        model, torch.zeros(1, 3, 256, 256), str(path), input_names=["image"], output_names=["probability"],
        dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    return path
