"""The gate policy (lungseg.gate.decide), its switches, header refusals and the flag words."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import Dataset

from lungseg.gate import Correction, GatePolicy, GateScores, decide, flag_words, header_refusal, review_flags


def scores(turns: int = 0, p_turn: float = 0.99, negative: float = 0.01, mirrored: float = 0.01,
           chest: float = 0.99) -> GateScores:
    rest = (1.0 - p_turn) / 3
    orientation = tuple(p_turn if k == turns else rest for k in range(4))
    return GateScores(orientation=orientation, negative=negative, mirrored=mirrored, chest=chest)


def header(**values: str) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def test_upright_positive_chest_passes_without_flags():
    decision = decide(scores(), header(BodyPartExamined="CHEST", ViewPosition="PA"), GatePolicy())
    assert decision.refused is None and decision.flags == [] and not decision.correction.any


@pytest.mark.parametrize(("turns", "flag", "correction"), [(1, "orientation_corrected:270", 3),
                                                           (2, "orientation_corrected:180", 2),
                                                           (3, "orientation_corrected:90", 1)])
def test_confident_quarter_turn_is_corrected(turns: int, flag: str, correction: int):
    decision = decide(scores(turns=turns), None, GatePolicy())
    assert decision.flags == [flag]
    assert decision.correction.quarter_turns == correction
    assert review_flags(decision.flags) == []  # a correction alone needs no review
    image = np.arange(12.0).reshape(3, 4)
    turned = np.rot90(image, turns)  # what the gate saw: the upright image turned
    assert np.array_equal(decision.correction.apply(turned), image)


def test_auto_orient_off_flags_instead_of_correcting():
    decision = decide(scores(turns=2, negative=0.97), None, GatePolicy(auto_orient=False))
    assert not decision.correction.any
    assert decision.flags == ["orientation_suspect:180", "negative_suspect"]
    assert review_flags(decision.flags) == decision.flags


def test_confident_negative_is_inverted_and_said():
    decision = decide(scores(negative=0.98), None, GatePolicy())
    assert decision.correction.negative and decision.flags == ["negative_corrected"]
    assert "inverted" in flag_words("negative_corrected")


def test_uncertain_heads_and_mirror_are_flagged():
    decision = decide(scores(p_turn=0.5, negative=0.4, mirrored=0.95), None, GatePolicy())
    assert decision.flags == ["gate_uncertain:orientation", "gate_uncertain:negative", "mirrored"]
    assert not decision.correction.any


def test_turn_below_correct_threshold_is_only_suspected():
    decision = decide(scores(turns=2, p_turn=0.8), None, GatePolicy())
    assert decision.flags == ["orientation_suspect:180"] and not decision.correction.any


def test_not_chest_refused_flagged_or_ignored_by_mode():
    confident = scores(chest=0.02)
    assert decide(confident, None, GatePolicy()).refused == "not_chest"
    flagged = decide(confident, None, GatePolicy(mode="flag"))
    assert flagged.refused is None and "not_chest" in flagged.flags
    assert decide(confident, None, GatePolicy(mode="off")).flags == []
    doubtful = decide(scores(chest=0.3), None, GatePolicy())
    assert doubtful.refused is None and "not_chest" in doubtful.flags


@pytest.mark.parametrize(("values", "code"), [({"BodyPartExamined": "HAND"}, "body_part:HAND"),
                                              ({"BodyPartExamined": "KNEE"}, "body_part:KNEE"),
                                              ({"BodyPartExamined": "CHEST", "ViewPosition": "LL"},
                                               "lateral_view:LL")])
def test_header_refusals(values: dict, code: str):
    ds = header(**values)
    assert header_refusal(ds)[0] == code
    refused = decide(scores(), ds, GatePolicy())
    assert refused.refused == code
    assert code.split(":")[1] in refused.refused_message
    assert decide(scores(), ds, GatePolicy(mode="flag")).flags == [code]
    assert decide(scores(), ds, GatePolicy(mode="off")).refused is None


def test_chest_or_missing_body_part_is_not_refused():
    assert header_refusal(header(BodyPartExamined="CHEST", ViewPosition="AP")) is None
    assert header_refusal(header()) is None
    assert header_refusal(None) is None


def test_no_gate_model_flags_gate_unavailable_but_still_refuses_by_header():
    assert decide(None, header(BodyPartExamined="CHEST"), GatePolicy()).flags == ["gate_unavailable"]
    assert decide(None, header(BodyPartExamined="HAND"), GatePolicy()).refused == "body_part:HAND"


def test_invalid_policy_is_rejected():
    with pytest.raises(ValueError, match="gate mode"):
        GatePolicy(mode="maybe")
    with pytest.raises(ValueError, match="not in"):
        GatePolicy(correct_threshold=1.5)


def test_correction_undo_maps_a_mask_back_to_the_stored_grid():
    stored = np.zeros((4, 6), bool)
    stored[0, :2] = True
    correction = Correction(quarter_turns=1, negative=True)
    upright = correction.apply(stored.astype(np.float32))
    assert upright.shape == (6, 4)
    assert np.array_equal(correction.undo_mask(upright < 0.5), stored)


def test_mirror_threshold_is_configurable():
    assert "mirrored" not in decide(scores(mirrored=0.8), None, GatePolicy()).flags
    assert "mirrored" in decide(scores(mirrored=0.8), None, GatePolicy(mirrored_threshold=0.5)).flags


def test_suspected_turn_names_the_same_correction_as_a_confident_one():
    confident = decide(scores(turns=1), None, GatePolicy())
    suspected = decide(scores(turns=1), None, GatePolicy(auto_orient=False))
    assert confident.flags == ["orientation_corrected:270"] and suspected.flags == ["orientation_suspect:270"]
    assert "270 deg counter-clockwise" in flag_words(suspected.flags[0])
