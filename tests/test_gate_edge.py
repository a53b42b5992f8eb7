"""What a flag or a refusal does to real outputs: the REVIEW banner in a real SC (pydicom + dciodvfy),
the SEG description, the sidecar, header refusals in lungseg-edge and lungseg-segment, R/L markers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from edge_helpers import dciodvfy_errors, file_ref, make_cr, run_once, save, sc_files, sidecars

from lungseg.bundle import ONNX_FP32, default_bundle_dir
from lungseg.edge_runtime.overlay import REVIEW_RGB, orientation_markers, render_overlay

UID = "1.2.826.0.1.3680043.10.1082.9."


@pytest.fixture(scope="module")
def gateless_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped segmenter alone: a bundle without gate.onnx / shape_model.npz."""
    source = default_bundle_dir() / ONNX_FP32
    if not source.is_file():
        pytest.skip("no shipped model.onnx in the package")
    bundle = tmp_path_factory.mktemp("gateless")
    (bundle / ONNX_FP32).symlink_to(source)
    return bundle


def test_orientation_markers_follow_patient_orientation():
    assert orientation_markers(["L", "F"]) == {"right": "L", "left": "R"}
    assert orientation_markers(["R", "F"]) == {"right": "R", "left": "L"}
    assert orientation_markers(["H", "L"]) == {"bottom": "L", "top": "R"}  # stored turned a quarter
    assert orientation_markers(None) == {} and orientation_markers(["A"]) == {}


def test_banner_is_drawn_only_when_review_is_needed():
    pixels = np.full((300, 400), 0.5, np.float32)
    mask = np.zeros((300, 400), bool)
    plain = render_overlay(pixels, mask, areas=["total: 1.0 cm2"])
    flagged = render_overlay(pixels, mask, areas=["total: 1.0 cm2"], review=["image looks mirrored left-right"])
    assert "banner" not in plain.boxes and not np.all(plain.rgb[2, :] == REVIEW_RGB)
    assert flagged.boxes["banner"][:3] == (0, 0, 400)  # full width, on top where no lung is
    assert np.all(flagged.rgb[2, :] == REVIEW_RGB)


def test_flagged_result_has_banner_in_valid_sc_and_flags_in_seg_and_sidecar(tmp_path: Path, gateless_bundle: Path):
    """Without a gate every result is flagged gate_unavailable: the outputs must say REVIEW."""
    import pydicom

    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    save(make_cr(UID + "1", size=256, pixel_spacing=(0.7, 0.7)), watch / "chest.dcm")
    assert run_once(watch, out, gateless_bundle, state=state, seg=True) == 0
    [sidecar] = sidecars(out)
    assert "gate_unavailable" in sidecar["qa"]["flags"] and "gate_unavailable" in sidecar["qa"]["review"]
    [sc_path] = sc_files(out)
    sc = pydicom.dcmread(sc_path)
    rgb = sc.pixel_array
    banner_rows = [r for r in (1, rgb.shape[0] - 2) if np.all(rgb[r, :] == REVIEW_RGB)]
    assert banner_rows, "no full-width REVIEW banner above or below the lungs"
    assert "REVIEW: image gate unavailable" in str(sc.ImageComments)
    assert dciodvfy_errors(sc_path) == []
    seg = pydicom.dcmread(sc_path.with_name(sc_path.name.replace(".sc.dcm", ".seg.dcm")))
    assert seg.ContentDescription.startswith("REVIEW")
    assert "image gate unavailable" in seg.SegmentSequence[0].SegmentDescription
    assert dciodvfy_errors(sc_path.with_name(sc_path.name.replace(".sc.dcm", ".seg.dcm"))) == []


def test_hand_is_refused_by_the_edge_with_its_reason(tmp_path: Path, gateless_bundle: Path):
    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    hand = make_cr(UID + "2")
    hand.BodyPartExamined = "HAND"
    save(hand, watch / "hand.dcm")
    assert run_once(watch, out, gateless_bundle, state=state) == 1  # 1: an input was quarantined
    assert sidecars(out) == [] and sc_files(out) == []
    reason = json.loads((state / "quarantine" / f"{file_ref(state, watch, 'hand.dcm')}.reason.json").read_text())
    assert reason["code"] == "refused_body_part"
    assert "HAND" in reason["message"] and "not a chest" in reason["message"]


def test_gate_off_segments_the_hand_anyway(tmp_path: Path, gateless_bundle: Path):
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    hand = make_cr(UID + "3")
    hand.BodyPartExamined = "HAND"
    save(hand, watch / "hand.dcm")
    assert run_once(watch, out, gateless_bundle, gate="off") == 0
    [sidecar] = sidecars(out)
    assert "gate_unavailable" not in sidecar["qa"]["flags"]


def test_segment_cli_refuses_a_knee_per_file(tmp_path: Path, gateless_bundle: Path):
    from lungseg.segment import main

    knee = make_cr(UID + "4")
    knee.BodyPartExamined = "KNEE"
    save(knee, tmp_path / "knee.dcm")
    save(make_cr(UID + "5"), tmp_path / "frontal.dcm")
    report = tmp_path / "out.jsonl"
    code = main([str(tmp_path / "knee.dcm"), str(tmp_path / "frontal.dcm"), "--out", str(tmp_path / "masks"),
                 "--model", str(gateless_bundle), "--json-out", str(report)])
    assert code == 1
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert lines[0]["error"] == "refused (body_part:KNEE): BodyPartExamined is KNEE, not a chest: not segmented"
    assert lines[1]["flags"] == ["gate_unavailable", "shape_check_unavailable"]
    assert (tmp_path / "masks" / "frontal_mask.png").is_file()
    assert not (tmp_path / "masks" / "knee_mask.png").exists()
