"""The pixel spacing is checked against the size of real chests; impossible spacings are flagged."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT

from lungseg.spacing_check import FLAG, check_spacing, parse_age

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "cxr"


def _adult_mask() -> np.ndarray:
    """A real lung mask from the fixtures (a chest-cropped film), used as if it were an adult's 43 cm film."""
    with (FIXTURES / "manifest.csv").open() as f:
        row = next(iter(csv.DictReader(f)))
    return cv2.imread(str(FIXTURES / row["mask"]), cv2.IMREAD_GRAYSCALE) == 255


@pytest.mark.parametrize(("value", "years"), [("045Y", 45.0), ("006M", 0.5), ("003W", 3 * 7 / 365.25),
                                               ("010D", 10 / 365.25), (" 045y ", 45.0), ("45", None), ("", None),
                                               (None, None), ("045X", None), ("1234Y", None)])
def test_patient_age_parsing(value, years) -> None:
    assert parse_age(value) == (pytest.approx(years) if years is not None else None)


def test_a_downsampled_adult_film_keeping_its_detector_spacing_is_flagged() -> None:
    mask = _adult_mask()
    native = (1024, round(1024 * mask.shape[1] / mask.shape[0]))
    true_spacing = 430.0 / native[0]  # a 43 cm film at 1,024 px: ~0.42 mm
    good = check_spacing(mask, (true_spacing, true_spacing), native_shape=native, patient_age="052Y",
                         spacing_source="PixelSpacing")
    assert good.checked and good.plausible and good.areas_reliable and good.flags == []
    for detector in (0.139, 0.16, 0.194):  # the archives' kept detector spacing
        bad = check_spacing(mask, (detector, detector), native_shape=native, patient_age="052Y",
                            spacing_source="PixelSpacing")
        assert not bad.plausible and not bad.areas_reliable and bad.flags == [FLAG]
        assert "outside" in bad.reason and bad.to_dict()["flags"] == [FLAG]
        assert bad.lung_height_cm is not None and bad.lung_height_cm < 14


def test_without_an_age_only_what_no_age_allows_is_flagged() -> None:
    mask = _adult_mask()
    native = (1024, round(1024 * mask.shape[1] / mask.shape[0]))
    small = check_spacing(mask, (0.16, 0.16), native_shape=native)  # a 16 cm field: a newborn's, possibly
    assert small.plausible and small.age_years is None
    huge = check_spacing(mask, (0.9, 0.9), native_shape=native)  # a 92 cm field: no human chest
    assert not huge.plausible


def test_a_child_sized_chest_is_plausible_for_a_child_not_for_an_adult() -> None:
    mask = _adult_mask()
    native = (1024, round(1024 * mask.shape[1] / mask.shape[0]))
    spacing = (0.13, 0.13)  # lungs about 10 cm high
    assert check_spacing(mask, spacing, native_shape=native, patient_age="002Y").plausible
    assert not check_spacing(mask, spacing, native_shape=native, patient_age="040Y").plausible


def test_no_spacing_or_no_lungs_is_not_judged() -> None:
    mask = _adult_mask()
    none = check_spacing(mask, None, native_shape=mask.shape)
    assert not none.checked and none.plausible and not none.areas_reliable and none.flags == []
    empty = check_spacing(np.zeros_like(mask), (0.4, 0.4), native_shape=mask.shape)
    assert not empty.checked and empty.flags == []


def test_a_reduced_resolution_mask_is_measured_on_the_source_grid() -> None:
    mask = _adult_mask()
    native = (mask.shape[0] * 4, mask.shape[1] * 4)
    full = cv2.resize(mask.astype(np.uint8), native[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
    a = check_spacing(mask, (0.1, 0.1), native_shape=native)
    b = check_spacing(full, (0.1, 0.1), native_shape=native)
    assert a.lung_height_cm == pytest.approx(b.lung_height_cm, abs=0.1)
    assert a.lung_width_cm == pytest.approx(b.lung_width_cm, abs=0.1)
