"""Adding the gate to a bundle: ONNX export, torch-vs-onnxruntime parity, hashes, and the runtime loading it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cxr" / "images"


def _gate_run(folder: Path, seed: int, manifest: dict | None = None) -> Path:
    """A gate run folder: an untrained gate checkpoint, a fitted shape model, optionally gate.json."""
    from lungseg.bundle import GATE_MANIFEST, SHAPE_MODEL
    from lungseg.nn.gate_net import GateNet
    from lungseg.plausibility import ShapeModel

    folder.mkdir()
    torch.manual_seed(seed)
    torch.save({"state_dict": GateNet().state_dict(), "version": "test"}, folder / "gate.pt")
    vectors = np.random.default_rng(seed).random((20, 32 * 32))
    shape = ShapeModel.fit(vectors, 4)
    shape.calibrate(vectors)
    shape.save(folder / SHAPE_MODEL)
    if manifest is not None:
        (folder / GATE_MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_add_gate_writes_verified_files_that_the_runtime_loads(tmp_path: Path):
    from lungseg.bundle import GATE_MANIFEST, GATE_ONNX, SHAPE_MODEL, sha256_file, write_bundle_manifest
    from lungseg.export.gate_export import add_gate
    from lungseg.gate import gate_input_from_pixels, load_gate
    from lungseg.imaging import read_image
    from lungseg.plausibility import load_shape_model
    from lungseg.preprocess import preprocess_batch

    run = _gate_run(tmp_path / "run", 0)
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
    from lungseg.nn.gate_net import GateNet

    torch.save({"state_dict": GateNet().state_dict()}, tmp_path / "gate.pt")
    with pytest.raises(GateExportError, match="no shape model"):
        add_gate(tmp_path, tmp_path / "gate.pt", np.zeros((1, 3, 256, 256), np.float32), {})


def test_gate_only_swaps_the_gate_and_leaves_the_segmenter_untouched(tmp_path: Path, tiny_onnx: Path):
    """``lungseg-export --gate-only``: a new gate in an existing bundle, every other file as it was."""
    import shutil

    from lungseg.bundle import BUNDLE_MANIFEST, GATE_ONNX, sha256_file, write_bundle_manifest
    from lungseg.export.cli import EXIT_OK, EXIT_USAGE, main
    from lungseg.gate import load_gate

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copyfile(tiny_onnx, bundle / "model.onnx")
    write_bundle_manifest(bundle, {"name": "tiny"})
    model_sha = sha256_file(bundle / "model.onnx")
    run = _gate_run(tmp_path / "run", 1)

    args = ["--gate-only", "--gate-checkpoint", str(run / "gate.pt"), "--out", str(bundle),
            "--parity-data", str(FIXTURES.parent)]
    assert main(args) == EXIT_OK
    manifest = json.loads((bundle / BUNDLE_MANIFEST).read_text())
    assert manifest["name"] == "tiny" and manifest["files"]["model.onnx"]["sha256"] == model_sha
    assert manifest["files"][GATE_ONNX]["sha256"] == sha256_file(bundle / GATE_ONNX) == manifest["gate"]["sha256"]
    assert load_gate(bundle) is not None
    assert main(["--gate-only", "--gate-checkpoint", str(run / "gate.pt"), "--out", str(tmp_path / "nothing"),
                 "--parity-data", str(FIXTURES.parent)]) == EXIT_USAGE
    with pytest.raises(SystemExit):  # a segmenter export and a gate swap at once: refused
        main([*args, "--int8"])


def test_mirror_threshold_travels_from_the_calibration_to_the_runtime_policy(tmp_path: Path):
    """gate.json's calibrated mirror threshold is what the policy uses, unless one is given explicitly."""
    from lungseg.bundle import GATE_MANIFEST, write_bundle_manifest
    from lungseg.export.gate_export import add_gate
    from lungseg.gate import DEFAULT_MIRRORED_THRESHOLD, GatePolicy, consensus_logits, load_gate, mirror_evidence
    from lungseg.imaging import read_image
    from lungseg.preprocess import preprocess_batch

    run = _gate_run(tmp_path / "run", 2, {"version": "test", "policy": {"mirrored_threshold": 0.613}})
    batch, _ = preprocess_batch([read_image(p).pixels for p in sorted(FIXTURES.glob("*.png"))[:3]])
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    add_gate(bundle, run / "gate.pt", batch, {"source": "fixtures"})
    write_bundle_manifest(bundle)

    gate = load_gate(bundle)
    assert gate is not None and gate.mirrored_threshold == pytest.approx(0.613)
    assert gate.policy(GatePolicy()).mirrored_threshold == pytest.approx(0.613)
    assert gate.policy(GatePolicy(mirrored_threshold=0.95)).mirrored_threshold == 0.95
    (bundle / GATE_MANIFEST).write_text(json.dumps({"version": "test"}))  # changed after hashing: not trusted
    assert load_gate(bundle).policy(GatePolicy()).mirrored_threshold == DEFAULT_MIRRORED_THRESHOLD

    x = np.random.default_rng(3).random((4, 1, 128, 128)).astype(np.float32)
    plain = mirror_evidence(consensus_logits(gate.raw_logits, x))
    flipped = mirror_evidence(consensus_logits(gate.raw_logits, np.ascontiguousarray(x[..., ::-1])))
    assert np.allclose(plain, -flipped, atol=1e-5)  # a flip reverses the evidence exactly
    raw = gate.raw_logits(x)
    assert np.allclose(consensus_logits(gate.raw_logits, x)[:, :6], raw[:, :6])  # other heads: the image's own


def test_threshold_for_flags_at_most_the_budget():
    from lungseg.train.gate_calibrate import threshold_for

    scores = np.linspace(-6, 6, 1000)  # logits
    t = threshold_for(scores, 0.01)
    flagged = np.mean(1 / (1 + np.exp(-scores)) >= t)
    assert flagged <= 0.01 and flagged >= 0.008
    assert threshold_for(scores, 0.0) > 1 / (1 + np.exp(-6.0)) - 1e-3
