"""Is the pixel spacing physically plausible for the lungs it measures?

Many archived radiographs keep the detector's pixel spacing after being downsampled (a 1,024-px
copy of a 43 cm film still saying 0.14 mm): every area computed from it is then several times
too small, yet looks like a measurement. This check measures the segmented lungs in millimetres
and compares them with the range of real human chests:

* lung field height (apex to the lowest lung point, both lungs) and width (outer edge to outer
  edge), from the mask's extent;
* the ranges depend on age when the file gives ``PatientAge`` (``nnnD/W/M/Y``); without it, the
  union of the paediatric and adult ranges is used, so only values impossible at any age flag.

The ranges (``RANGES_CM``) are deliberately wide: they are meant to catch order-of-magnitude
spacing errors (a factor of 2 or more), not to judge anatomy. Sources: adult PA radiographs show
lung fields about 22-30 cm high and 26-34 cm across (textbook radiographic anatomy; a 35 x 43 cm
cassette holds an adult chest with margin); children's thoraces scale with age from about 7-9 cm
high at birth (neonatal chest radiograph norms) to adult size by about 14-16 years. Each range
below widens those by roughly a third on both sides.

A spacing that fails is flagged ``pixel_spacing_implausible`` and the areas are marked unreliable
(shown and reported in pixels, never as cm² facts).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

FLAG = "pixel_spacing_implausible"

#: (lowest age in years, (height min, height max), (width min, width max)) in cm, by age band
RANGES_CM: tuple[tuple[float, tuple[float, float], tuple[float, float]], ...] = (
    (0.0, (4.0, 16.0), (5.0, 20.0)),  # first year
    (1.0, (6.0, 22.0), (8.0, 26.0)),  # 1-5 years
    (5.0, (9.0, 30.0), (12.0, 34.0)),  # 5-12 years
    (12.0, (12.0, 38.0), (16.0, 44.0)),  # 12-16 years
    (16.0, (14.0, 40.0), (18.0, 46.0)),  # adults
)
UNKNOWN_AGE_CM = ((4.0, 40.0), (5.0, 46.0))  # the union: only what no age allows

_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def parse_age(value: Any) -> float | None:
    """``PatientAge`` (AS: ``045Y``, ``006M``, ``003W``, ``010D``) in years; ``None`` when absent or malformed."""
    match = _AGE.match(str(value or "").strip().upper())
    if match is None:
        return None
    return int(match.group(1)) * _UNIT_YEARS[match.group(2)]


def ranges_for(age_years: float | None) -> tuple[tuple[float, float], tuple[float, float], str]:
    """``(height range, width range, which)`` in cm for this age (``None``: unknown)."""
    if age_years is None:
        return UNKNOWN_AGE_CM[0], UNKNOWN_AGE_CM[1], "any age"
    chosen = RANGES_CM[0]
    for band in RANGES_CM:
        if age_years >= band[0]:
            chosen = band
    return chosen[1], chosen[2], f"age {age_years:.1f} y (band from {chosen[0]:g} y)"


@dataclass(frozen=True)
class SpacingCheck:
    """The verdict on one image's spacing (``to_dict`` goes into the sidecar's QA)."""

    checked: bool  # False: no usable spacing or no lungs to measure
    plausible: bool
    areas_reliable: bool
    reason: str
    spacing_source: str | None
    calibration_type: str | None
    lung_height_cm: float | None = None
    lung_width_cm: float | None = None
    field_of_view_cm: tuple[float, float] | None = None
    age_years: float | None = None
    height_range_cm: tuple[float, float] | None = None
    width_range_cm: tuple[float, float] | None = None

    @property
    def flags(self) -> list[str]:
        return [] if self.plausible else [FLAG]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flags": self.flags}


def check_spacing(mask: np.ndarray, spacing_mm: tuple[float, float] | None, *, native_shape: tuple[int, int],
                  spacing_source: str | None = None, calibration_type: str | None = None,
                  patient_age: Any = None) -> SpacingCheck:
    """Measure ``mask`` (any resolution; ``native_shape`` is the source grid the spacing describes) in cm."""
    age = parse_age(patient_age)
    if spacing_mm is None:
        return SpacingCheck(False, True, False, "no usable pixel spacing: areas in pixels only", spacing_source,
                            calibration_type, age_years=age)
    rows_idx = np.flatnonzero(mask.any(axis=1))
    cols_idx = np.flatnonzero(mask.any(axis=0))
    row_mm = spacing_mm[0] * native_shape[0] / mask.shape[0]
    col_mm = spacing_mm[1] * native_shape[1] / mask.shape[1]
    fov = (round(native_shape[0] * spacing_mm[0] / 10, 1), round(native_shape[1] * spacing_mm[1] / 10, 1))
    if rows_idx.size == 0:
        return SpacingCheck(False, True, True, "no lungs to measure", spacing_source, calibration_type,
                            field_of_view_cm=fov, age_years=age)
    height = round((rows_idx[-1] - rows_idx[0] + 1) * row_mm / 10, 1)
    width = round((cols_idx[-1] - cols_idx[0] + 1) * col_mm / 10, 1)
    height_range, width_range, which = ranges_for(age)
    problems = []
    if not height_range[0] <= height <= height_range[1]:
        problems.append(f"lung height {height} cm outside {height_range[0]:g}-{height_range[1]:g} cm")
    if not width_range[0] <= width <= width_range[1]:
        problems.append(f"lung width {width} cm outside {width_range[0]:g}-{width_range[1]:g} cm")
    plausible = not problems
    reason = (f"lungs {height} x {width} cm within the range for {which}" if plausible else
              "; ".join(problems) + f" ({which}): the pixel spacing does not fit this image")
    return SpacingCheck(True, plausible, plausible, reason, spacing_source, calibration_type, height, width, fov,
                        age, height_range, width_range)


__all__ = ["FLAG", "RANGES_CM", "SpacingCheck", "check_spacing", "parse_age", "ranges_for"]
