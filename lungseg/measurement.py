"""What every output states about one segmented radiograph: lung areas, QA flags, the spacing check.

One computation for ``lungseg-edge`` (overlay, sidecar, SR) and ``lungseg-segment`` (JSON line, SR),
so the two can never disagree on an area or a flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lungseg.gate import flag_words
from lungseg.inference import Segmentation, named_lung_areas
from lungseg.plausibility import mask_qa
from lungseg.radiograph import Radiograph
from lungseg.spacing_check import SpacingCheck, check_spacing
from lungseg.sr_report import LungMeasurements

#: the sidecar's per-lung keys -> the SR's sides (image-side keys have no anatomical side: not in the SR)
_SIDES = {"right_lung": "right", "left_lung": "left"}


@dataclass(frozen=True)
class MaskMeasurement:
    """Areas (:func:`lungseg.inference.named_lung_areas`' keys), QA (``flags``, ``review``, the checks'
    details, ``spacing``) and whether the pixel spacing is plausible for these lungs."""

    areas: dict[str, Any]
    qa: dict[str, Any]
    spacing: SpacingCheck

    @property
    def flags(self) -> list[str]:
        return list(self.qa["flags"])

    def review_text(self) -> str:
        """``"REVIEW: ..."`` (the flags that need review, in words), or ``""``."""
        review = self.qa.get("review", self.qa["flags"])
        return "REVIEW: " + ", ".join(flag_words(f) for f in review) if review else ""


def qa_report(mask: np.ndarray, raw_qa: dict[str, Any]) -> dict[str, Any]:
    """The QA of a segmentation: the gated path's (``raw_qa`` with flags) or the core mask checks."""
    if "flags" in raw_qa:
        return dict(raw_qa)
    qa = mask_qa(mask)
    return {**qa, "review": list(qa["flags"]), **raw_qa}


def _text(radiograph: Radiograph, keyword: str) -> str | None:
    value = radiograph.dataset.get(keyword) if radiograph.dataset is not None else None
    return str(value) if value not in (None, "") else None


def measure_mask(radiograph: Radiograph, segmentation: Segmentation, *, native_areas: bool = False) -> MaskMeasurement:
    """Areas and QA from the model-resolution mask, and the spacing's plausibility (its flags added to QA).

    ``native_areas`` counts the areas on the native-size mask instead (``lungseg-segment``: they then
    equal the mask PNG it writes); the edge scales the model-resolution count to native pixels.
    """
    orientation = radiograph.dataset.get("PatientOrientation") if radiograph.dataset is not None else None
    if native_areas:
        areas = named_lung_areas(segmentation.mask, radiograph.pixel_spacing_mm, orientation)
    else:
        areas = named_lung_areas(segmentation.final_mask, radiograph.pixel_spacing_mm, orientation,
                                 segmentation.native_pixels_per_pixel)
    qa = qa_report(segmentation.final_mask, segmentation.qa)
    spacing = check_spacing(segmentation.final_mask, radiograph.pixel_spacing_mm, native_shape=radiograph.source_shape,
                            spacing_source=radiograph.facts.get("spacing_source"),
                            calibration_type=_text(radiograph, "PixelSpacingCalibrationType"),
                            patient_age=_text(radiograph, "PatientAge"))
    if spacing.flags:
        qa = {**qa, "flags": [*qa["flags"], *spacing.flags]}
    if spacing.checked or radiograph.pixel_spacing_mm is not None:
        qa = {**qa, "spacing": spacing.to_dict()}
    return MaskMeasurement(areas, qa, spacing)


def sr_values(radiograph: Radiograph, measured: MaskMeasurement) -> LungMeasurements:
    """What the SR states: areas in cm² when the spacing is usable and plausible, else in pixels (see
    :mod:`lungseg.sr_report`); the QA flags and gate decisions."""
    areas = measured.areas
    cm2 = areas.get("lung_areas_cm2")
    px = {"total": int(areas["lung_area_px"])}
    px.update({_SIDES[k]: int(v) for k, v in (areas.get("lung_area_px_by_lung") or {}).items() if k in _SIDES})
    by_cm2 = None
    if cm2 is not None:
        by_cm2 = {"total": float(cm2["total"])}
        by_cm2.update({_SIDES[k]: float(v) for k, v in cm2.items() if k in _SIDES})
    return LungMeasurements(areas_cm2=by_cm2, areas_px=px,
                            areas_reliable=cm2 is not None and measured.spacing.areas_reliable,
                            reliability_reason=measured.spacing.reason,
                            spacing_source=radiograph.facts.get("spacing_source"), qa_flags=tuple(measured.flags))
