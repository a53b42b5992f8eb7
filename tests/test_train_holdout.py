"""Held-out scoring through the product's own paths (lungseg-segment and the edge DICOM path)."""

from __future__ import annotations

import pytest

from lungseg.data import load_manifest
from lungseg.train.holdout import score_bundle, score_edge


@pytest.mark.slow
@pytest.mark.integration  # the edge path runs lungseg-edge as a process
def test_segment_and_edge_paths_score_the_same_images_alike(fixture_manifest):
    records = load_manifest(fixture_manifest)[:3]
    by_segment = score_bundle(None, records)
    by_edge = score_edge(None, records, ["--backend", "cpu"])
    assert by_segment["scored"] == by_edge["scored"] == 3
    assert by_segment["mean_dice"] > 0.85, by_segment["rows"]
    # the same model through two front ends: the masks may differ only by int8 vs fp32 and DICOM rendering
    for a, b in zip(by_segment["rows"], by_edge["rows"], strict=True):
        assert a["id"] == b["id"] and abs(a["dice"] - b["dice"]) < 0.03


def test_flip_averaging_maps_the_mirror_back_before_averaging():
    import numpy as np

    from lungseg.train.tta_eval import FlipAveraged

    ramp = np.linspace(0.0, 1.0, 8, dtype=np.float32)

    class PositionWeighted:  # a "model" whose answer depends on where in the image a pixel is
        def predict(self, batch):
            return batch[:, 0] * ramp

    batch = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    averaged = FlipAveraged(PositionWeighted()).predict(batch)
    np.testing.assert_allclose(averaged, batch[:, 0] * (ramp + ramp[::-1]) / 2, rtol=1e-6)


def test_flip_averaged_shipped_model_scores_like_the_plain_one(fixture_manifest):
    from lungseg.bundle import default_bundle_dir, resolve_bundle
    from lungseg.predictors import OnnxRuntimePredictor
    from lungseg.train.tta_eval import FlipAveraged, score

    records = load_manifest(fixture_manifest)[:2]
    predictor = OnnxRuntimePredictor(str(resolve_bundle(default_bundle_dir()).onnx), device="cpu", threads=2)
    plain, flipped = score(predictor, records), score(FlipAveraged(predictor), records)
    assert plain["n"] == flipped["n"] == 2
    assert plain["dice_mean"] > 0.85 and flipped["dice_mean"] > 0.85
    assert plain["dice"] != flipped["dice"]  # a second, different opinion was averaged in
