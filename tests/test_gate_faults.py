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


def test_false_alarms_are_counted_per_subgroup_with_their_reasons() -> None:
    """gate_eval's breakdown of good images flagged: by view, class, portable and white-out (bright lungs)."""
    from types import SimpleNamespace

    from lungseg.train.gate_eval import groups_of, lung_brightness, summarise

    pixels = np.full((4, 4), 0.2, dtype=np.float32)
    lung = np.zeros((4, 4), dtype=bool)
    lung[1:3, 1:3] = True
    pixels[lung] = 0.9
    assert lung_brightness(pixels, lung, np.ones_like(lung)) == pytest.approx(0.9)
    child = SimpleNamespace(view="AP (pediatric)", image_class="normal", portable=False)
    icu = SimpleNamespace(view="AP Supine", image_class="covid", portable=True)
    assert groups_of(icu, 0.9, 0.8) == ["view:AP Supine", "class:covid", "portable", "white_out"]
    rows = [{"class": "good", "id": "a", "refused": "not_a_chest", "flags": [], "caught": True,
             "groups": groups_of(child, 0.5, 0.8)},
            {"class": "good", "id": "b", "refused": None, "flags": ["implausible_shape"], "caught": True,
             "groups": groups_of(icu, 0.9, 0.8)},
            {"class": "good", "id": "c", "refused": None, "flags": [], "caught": False,
             "groups": groups_of(icu, 0.5, 0.8)}]
    report = summarise(rows, [], [], [], {}, GatePolicy())
    groups = report["good_flagged_by_group"]
    assert groups["view:AP (pediatric)"] == {"n": 1, "flagged": 1, "rate": 1.0, "reasons": ["not_a_chest"]}
    assert groups["white_out"] == {"n": 1, "flagged": 1, "rate": 1.0, "reasons": ["implausible_shape"]}
    assert groups["view:AP Supine"]["n"] == 2 and groups["view:AP Supine"]["rate"] == 0.5


def test_hard_good_chests_opacify_the_lungs_or_shrink_the_patient() -> None:
    """The gate's hard positives (gate 0.3.0): a white-out brightens the lungs only; a small patient keeps the
    image size, the film shrunk inside a dark border."""
    from lungseg.train.gate_data import hard_chest, small_patient, white_out

    rng = np.random.default_rng(0)
    pixels = np.full((120, 100), 0.3, dtype=np.float32)
    pixels[:, 42:58] = 0.8  # the mediastinum: brighter than the 0.9 quantile
    lung = np.zeros_like(pixels, dtype=bool)
    lung[20:100, 10:40] = lung[20:100, 60:90] = True
    opaque = white_out(pixels, lung, 0.85)
    assert opaque[60, 25] > 0.7 and opaque[60, 75] > 0.7  # lungs near the mediastinum's brightness
    assert opaque[5, 5] == pytest.approx(0.3, abs=0.02)  # far from the lungs: unchanged
    small = small_patient(pixels, rng, 0.5, 0.5)
    assert small.shape == pixels.shape
    assert (small <= 0.3 + 1e-6).mean() > 0.7  # mostly the dark border and the shrunk lungs
    assert (small > 0.75).sum() == pytest.approx(0.25 * (pixels > 0.75).sum(), rel=0.3)  # mediastinum at 1/4 area
    for _ in range(4):
        assert hard_chest(pixels, lung, rng).shape == pixels.shape
