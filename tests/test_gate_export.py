"""Adding the gate to a bundle: ONNX export, torch-vs-onnxruntime parity, hashes, and the runtime loading it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cxr" / "images"


def test_add_gate_writes_verified_files_that_the_runtime_loads(tmp_path: Path):
    from lungseg.bundle import GATE_MANIFEST, GATE_ONNX, SHAPE_MODEL, sha256_file, write_bundle_manifest
    from lungseg.export.gate_export import add_gate
    from lungseg.gate import gate_input_from_pixels, load_gate
    from lungseg.imaging import read_image
    from lungseg.plausibility import ShapeModel, load_shape_model
    from lungseg.preprocess import preprocess_batch
    from lungseg.train.gate_model import GateNet

    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    torch.save({"state_dict": GateNet().state_dict(), "version": "test"}, run / "gate.pt")
    vectors = np.random.default_rng(0).random((20, 32 * 32))
    shape = ShapeModel.fit(vectors, 4)
    shape.calibrate(vectors)
    shape.save(run / SHAPE_MODEL)
    pixels = [read_image(p).pixels for p in sorted(FIXTURES.glob("*.png"))[:4]]
    batch, _ = preprocess_batch(pixels)
    bundle = tmp_path / "bundle"
    bundle.mkdir()

    manifest = add_gate(bundle, run / "gate.pt", batch, {"source": "fixtures"})

    assert manifest["parity"]["passed"] and manifest["parity"]["n_images"] == 4 * 8
    assert manifest["sha256"] == sha256_file(bundle / GATE_ONNX)
    assert manifest["shape_model"]["sha256"] == sha256_file(bundle / SHAPE_MODEL)
    assert json.loads((bundle / GATE_MANIFEST).read_text())["sha256"] == manifest["sha256"]
    gate = load_gate(bundle)
    assert gate is not None and load_shape_model(bundle) is not None
    scores = gate.scores(np.stack([gate_input_from_pixels(p) for p in pixels]))
    assert len(scores) == 4 and all(0.0 <= s.chest <= 1.0 for s in scores)

    write_bundle_manifest(bundle)  # hashed: a changed gate file is refused by the runtime
    with (bundle / GATE_ONNX).open("ab") as fh:
        fh.write(b"\0")
    assert load_gate(bundle) is None


def test_missing_shape_model_is_a_clear_error(tmp_path: Path):
    from lungseg.export.gate_export import GateExportError, add_gate
    from lungseg.train.gate_model import GateNet

    torch.save({"state_dict": GateNet().state_dict()}, tmp_path / "gate.pt")
    with pytest.raises(GateExportError, match="no shape model"):
        add_gate(tmp_path, tmp_path / "gate.pt", np.zeros((1, 3, 256, 256), np.float32), {})
