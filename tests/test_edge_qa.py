import numpy as np

from lungseg.measurement import qa_report


def _mask(left: int, right: int) -> np.ndarray:
    mask = np.zeros((100, 100), bool)
    mask[10 : 10 + left, 10:40] = True
    mask[10 : 10 + right, 60:90] = True
    return mask


def test_two_similar_lungs_pass():
    assert qa_report(_mask(60, 55), {})["flags"] == []


def test_one_tiny_lung_is_flagged_as_asymmetric():
    assert qa_report(_mask(60, 5), {})["flags"] == ["lung_size_asymmetry"]


def test_single_component_and_implausible_area():
    mask = np.zeros((100, 100), bool)
    mask[40:42, 40:42] = True
    assert qa_report(mask, {})["flags"] == ["not_two_lungs", "implausible_area"]
