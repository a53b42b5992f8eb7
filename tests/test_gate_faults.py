"""Each fault class through the real gate, policy, segmenter and shape check, on the committed fixtures.

Uses the shipped bundle's gate (``LUNGSEG_GATE_BUNDLE`` may point at another bundle folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from lungseg.bundle import default_bundle_dir, resolve_bundle
from lungseg.gate import GATE_ONNX, GatePolicy, Refused, gated_segment, load_gate
from lungseg.imaging import Radiograph, read_image
from lungseg.metrics import dice
from lungseg.plausibility import load_shape_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cxr" / "images"
SHARED_DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
IMAGES = ("05878ee1390b", "2bcf29a3bace", "531bb65019bd", "be940a9de7d7")


@pytest.fixture(scope="module")
def parts():
    from lungseg.predictors import OnnxRuntimePredictor

    root = Path(os.environ.get("LUNGSEG_GATE_BUNDLE", default_bundle_dir()))
    if not (root / GATE_ONNX).is_file():
        pytest.skip(f"the bundle {root.name} has no {GATE_ONNX} (export it with lungseg-export --gate-checkpoint)")
    bundle = resolve_bundle(root)
    return OnnxRuntimePredictor(str(bundle.onnx), threads=2), load_gate(root), load_shape_model(root)


def run(parts, pixels: np.ndarray, policy: GatePolicy | None = None, name: str = "fixture"):
    predictor, gate, shape_model = parts
    radiograph = Radiograph(pixels=np.ascontiguousarray(pixels, np.float32), source=name)
    return gated_segment(predictor, gate, [radiograph], None, policy or GatePolicy(), shape_model)[0]


def fixture(name: str) -> np.ndarray:
    return read_image(FIXTURES / f"{name}.png").pixels


@pytest.mark.parametrize("name", IMAGES)
def test_upright_fixture_passes_clean(parts, name: str):
    result = run(parts, fixture(name))
    assert not isinstance(result, Refused)
    assert result.qa["flags"] == [], result.qa


@pytest.mark.parametrize("name", IMAGES)
def test_upside_down_is_corrected_and_mapped_back(parts, name: str):
    pixels = fixture(name)
    upright = run(parts, pixels)
    turned = run(parts, np.rot90(pixels, 2))
    assert "orientation_corrected:180" in turned.qa["flags"]
    assert turned.mask.shape == pixels.shape
    assert dice(np.rot90(turned.mask, 2), upright.mask) > 0.97


@pytest.mark.parametrize(("turns", "flag"), [(1, "orientation_corrected:270"), (3, "orientation_corrected:90")])
def test_quarter_turn_is_corrected(parts, turns: int, flag: str):
    pixels = fixture(IMAGES[0])
    result = run(parts, np.rot90(pixels, turns))
    assert flag in result.qa["flags"]
    assert result.mask.shape == np.rot90(pixels, turns).shape


def test_negative_is_corrected(parts):
    result = run(parts, 1.0 - fixture(IMAGES[1]))
    assert "negative_corrected" in result.qa["flags"]


def test_auto_orient_off_flags_the_negative_for_review(parts):
    result = run(parts, 1.0 - fixture(IMAGES[1]), GatePolicy(auto_orient=False))
    assert "negative_suspect" in result.qa["review"]


def test_mirrored_is_flagged(parts):
    flagged = [run(parts, fixture(name)[:, ::-1]).qa["review"] for name in IMAGES]
    assert sum("mirrored" in review for review in flagged) >= 3, flagged


def test_small_crop_is_not_taken_for_a_chest(parts):
    pixels = fixture(IMAGES[2])
    rows, cols = pixels.shape
    result = run(parts, pixels[rows // 3: rows // 3 + rows // 4, cols // 4: cols // 4 + cols // 4])
    assert isinstance(result, Refused) or result.qa["review"], "a quarter of a radiograph passed as a chest"


@pytest.mark.parametrize("name", ["dx_chest_mono2_rotated_j2k_lossless.dcm", "dx_chest_mono1_j2k_lossless.dcm"])
def test_real_problem_files_are_flagged_or_corrected(parts, name: str):
    path = SHARED_DICOM / name
    if not path.is_file():
        pytest.skip(f"real DICOM not present at ../shared/data/dicom/{name}")
    predictor, gate, shape_model = parts
    result = gated_segment(predictor, gate, [read_image(path)], None, GatePolicy(), shape_model)[0]
    assert isinstance(result, Refused) or result.qa["flags"], "a file known to be problematic passed clean"


def test_real_problem_files_say_why_on_the_edge_overlay(parts, tmp_path: Path):
    """Through lungseg-edge: each SC carries the reason (banner and/or correction note) in words."""
    import json
    import shutil

    import pydicom
    from edge_helpers import dciodvfy_errors, run_once, sc_files

    names = ("dx_chest_mono2_rotated_j2k_lossless.dcm", "dx_chest_mono1_j2k_lossless.dcm")
    if not all((SHARED_DICOM / n).is_file() for n in names):
        pytest.skip("real DICOM files not present at ../shared/data/dicom")
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for name in names:
        shutil.copyfile(SHARED_DICOM / name, watch / name)
    bundle = Path(os.environ.get("LUNGSEG_GATE_BUNDLE", default_bundle_dir()))
    assert run_once(watch, out, bundle) == 0
    for sc_path in sc_files(out):
        sidecar = json.loads(sc_path.with_name(sc_path.name.replace(".sc.dcm", ".json")).read_text())
        assert sidecar["qa"]["flags"], sidecar["qa"]
        comments = str(pydicom.dcmread(sc_path, stop_before_pixels=True).ImageComments)
        assert "REVIEW:" in comments or "before segmenting" in comments, comments
        assert dciodvfy_errors(sc_path) == []
    assert len(sc_files(out)) == 2
