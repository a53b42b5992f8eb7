import math

import numpy as np
import pytest

from lungseg.metrics import dice, image_metrics, roc_auc, summarise, summarise_by


def test_hand_computed_confusion():
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    prob = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1], np.float32)
    m = image_metrics(prob, truth)
    # TP=3 FN=1 FP=1 TN=5
    assert m["ACC"] == pytest.approx(0.8)
    assert m["DICE"] == pytest.approx(6 / 8)
    assert m["JACC"] == pytest.approx(3 / 5)
    assert m["SENS"] == pytest.approx(0.75)
    assert m["SPEC"] == pytest.approx(5 / 6)
    assert m["PREC"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert m["RECA"] == pytest.approx((0.75 + 5 / 6) / 2)
    f1_lung = 2 * 0.75 * 0.75 / 1.5
    f1_bg = 2 * (5 / 6) * (5 / 6) / (10 / 6)
    assert m["F1"] == pytest.approx((f1_lung + f1_bg) / 2)
    # AUC: positives 0.9,0.8,0.7,0.2 vs negatives 0.6,0.1x5: pairs won = 3*6 + 1*5 = 23 of 24
    assert m["AUC"] == pytest.approx(23 / 24)


def test_auc_ties_and_degenerate():
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_ignore_pixels_are_left_out():
    truth = np.array([1, 1, 0, 0], bool)
    prob = np.array([0.9, 0.9, 0.1, 0.9], np.float32)
    valid = np.array([1, 1, 1, 0], bool)
    m = image_metrics(prob, truth, valid)
    assert m["DICE"] == 1.0 and m["ACC"] == 1.0 and m["AUC"] == 1.0
    assert image_metrics(prob, truth)["DICE"] == pytest.approx(4 / 5)


def test_dice_and_summaries():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[:1] = True
    assert dice(a, b) == pytest.approx(2 * 4 / 12)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    rows = [{"DICE": 0.9, "class": "covid"}, {"DICE": 0.7, "class": "covid"}, {"DICE": 0.5, "class": "normal"}]
    s = summarise(rows)
    assert s["DICE"]["mean"] == pytest.approx(0.7) and s["DICE"]["n"] == 3
    by = summarise_by(rows, "class")
    assert by["covid"]["DICE"]["mean"] == pytest.approx(0.8) and by["covid"]["DICE"]["std"] == pytest.approx(0.1)
