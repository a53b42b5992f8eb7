"""The mask checks of lungseg.plausibility: component/area flags and the PCA shape model."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungseg.bundle import default_bundle_dir
from lungseg.plausibility import ShapeModel, load_shape_model, mask_qa, shape_vector

FIXTURE_MASKS = Path(__file__).resolve().parent / "fixtures" / "cxr" / "masks"


def lung_pair(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Two upright lung-like ellipses with a little random variation."""
    mask = np.zeros((size, size), np.uint8)
    for cx in (0.3, 0.7):
        centre = (int(size * (cx + rng.normal(0, 0.02))), int(size * (0.5 + rng.normal(0, 0.02))))
        axes = (int(size * rng.uniform(0.12, 0.16)), int(size * rng.uniform(0.28, 0.34)))
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, -1)
    return mask.astype(bool)


@pytest.fixture(scope="module")
def fitted() -> ShapeModel:
    rng = np.random.default_rng(0)
    vectors = np.stack([shape_vector(lung_pair(rng)) for _ in range(200)])
    model = ShapeModel.fit(vectors, n_components=6)
    model.calibrate(vectors)
    return model


def test_lung_pairs_like_the_training_ones_are_plausible(fitted: ShapeModel):
    rng = np.random.default_rng(1)
    plausible = [fitted.check(lung_pair(rng))["plausible"] for _ in range(40)]
    assert np.mean(plausible) >= 0.9  # thresholds sit at 1.15 x the 99th percentile of the fitted masks


def test_turned_and_blob_masks_are_implausible(fitted: ShapeModel):
    rng = np.random.default_rng(2)
    assert not fitted.check(np.rot90(lung_pair(rng)))["plausible"]
    blob = np.zeros((128, 128), bool)
    blob[80:120, 10:120] = True
    assert not fitted.check(blob)["plausible"]
    flags = mask_qa(blob, fitted)["flags"]
    assert "implausible_shape" in flags and "not_two_lungs" in flags


def test_save_and_load_round_trip(fitted: ShapeModel, tmp_path: Path):
    path = tmp_path / "shape_model.npz"
    fitted.save(path)
    loaded = ShapeModel.load(path)
    mask = lung_pair(np.random.default_rng(3))
    assert loaded.check(mask) == fitted.check(mask)


def test_mask_qa_component_and_area_flags_without_a_shape_model():
    rng = np.random.default_rng(4)
    report = mask_qa(lung_pair(rng))
    assert report["flags"] == [] and report["components"] == 2 and "shape" not in report
    one = np.zeros((100, 100), bool)
    one[40:42, 40:42] = True
    assert mask_qa(one)["flags"] == ["not_two_lungs", "implausible_area"]


def test_shipped_shape_model_accepts_real_masks_and_flags_quarter_turned_ones():
    model = load_shape_model(os.environ.get("LUNGSEG_GATE_BUNDLE", default_bundle_dir()))
    if model is None:
        pytest.skip("the bundle has no shape_model.npz (export it with lungseg-export --gate-checkpoint)")
    masks = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) >= 127 for p in sorted(FIXTURE_MASKS.glob("*.png"))]
    upright = [mask_qa(m, model)["flags"] for m in masks]
    turned = [mask_qa(np.rot90(m, 1), model)["flags"] for m in masks]  # quarter turns; 180 is the gate's job
    assert np.mean([flags == [] for flags in upright]) >= 0.9
    assert all(flags for flags in turned)
