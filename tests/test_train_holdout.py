"""Held-out scoring through the product's own paths (lungseg-segment and the edge DICOM path)."""

from __future__ import annotations

import pytest

from lungseg.data import load_manifest
from lungseg.train.holdout import score_bundle, score_edge


@pytest.mark.slow
def test_segment_and_edge_paths_score_the_same_images_alike(fixture_manifest):
    records = load_manifest(fixture_manifest)[:3]
    by_segment = score_bundle(None, records)
    by_edge = score_edge(None, records, ["--backend", "cpu"])
    assert by_segment["scored"] == by_edge["scored"] == 3
    assert by_segment["mean_dice"] > 0.85, by_segment["rows"]
    # the same model through two front ends: the masks may differ only by int8 vs fp32 and DICOM rendering
    for a, b in zip(by_segment["rows"], by_edge["rows"], strict=True):
        assert a["id"] == b["id"] and abs(a["dice"] - b["dice"]) < 0.03
