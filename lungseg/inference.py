"""One radiograph in, one native-size lung mask out: the path every front end shares.

The mask is postprocessed at the model's resolution (the letterbox's content region)
and upscaled once, when and to the size it is needed (:attr:`Segmentation.mask` is the
native-size one); areas are measured at model resolution with the spacing scaled to it.
``PostprocessConfig(resolution="native")`` restores 0.1.0's path (probabilities mapped to
native size first, everything measured there) for comparisons.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from lungseg.imaging import Radiograph
from lungseg.postprocess import PostprocessConfig, artefacts, component_stats, postprocess, upscale_guided, upscale_mask
from lungseg.predictors import Predictor
from lungseg.preprocess import Geometry, preprocess_batch


@dataclass
class Segmentation:
    """A radiograph's lung mask, plus what was measured on the way.

    ``final_mask`` is the postprocessed mask at the resolution it was computed at: the
    letterbox's content region at model size (default), or the native size.
    """

    final_mask: np.ndarray
    probability: np.ndarray
    geometry: Geometry
    timings_ms: dict[str, float] = field(default_factory=dict)
    qa: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.5

    @cached_property
    def mask(self) -> np.ndarray:
        """The mask at the source's native ``rows x columns`` (upscaled once, on first use)."""
        return self._upscaled((self.geometry.rows, self.geometry.columns))

    def mask_at(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask resized to ``shape`` (e.g. a reduced-resolution rendering of the source); at the native
        size, :attr:`mask` itself (the overlay and the SEG share one upscaling)."""
        if tuple(shape) == (self.geometry.rows, self.geometry.columns):
            return self.mask
        return self._upscaled(shape)

    def _upscaled(self, shape: tuple[int, int]) -> np.ndarray:
        content = self.probability[self.geometry.content] if self.probability.ndim == 2 else None
        if content is None or content.shape != self.final_mask.shape:
            return upscale_mask(self.final_mask, shape)
        return upscale_guided(self.final_mask, content, shape, self.threshold)

    @property
    def native_pixels_per_pixel(self) -> tuple[float, float]:
        """How many native pixels one ``final_mask`` pixel spans, per axis (rows, columns)."""
        return (self.geometry.rows / self.final_mask.shape[0], self.geometry.columns / self.final_mask.shape[1])

    def areas(self, spacing_mm: tuple[float, float] | None) -> dict[str, Any]:
        """:func:`lung_areas` of the final mask, in native pixels and mm²."""
        return lung_areas(self.final_mask, spacing_mm, self.native_pixels_per_pixel)


def lung_areas(mask: np.ndarray, spacing_mm: tuple[float, float] | None,
               native_pixels_per_pixel: tuple[float, float] = (1.0, 1.0)) -> dict[str, Any]:
    """Total and per-lung areas in (native) pixels, and in mm² when spacing is usable.

    ``mask`` may be a reduced-resolution mask: each of its pixels counts as
    ``native_pixels_per_pixel`` (rows, columns) native pixels and covers the native
    spacing scaled by the same factors. Lungs are the two largest components; the one
    whose centroid lies left in the image is reported as ``image_left`` (the patient's
    right lung on a PA/AP view).
    """
    areas, centroids = component_stats(mask)
    scale = float(native_pixels_per_pixel[0]) * float(native_pixels_per_pixel[1])
    total = int(areas.sum())
    result: dict[str, Any] = {"lung_area_px": round(total * scale)}
    per_side: dict[str, int] = {}
    if len(areas) >= 2:
        largest = np.argsort(areas)[::-1][:2]
        first, second = (largest[0], largest[1]) if centroids[largest[0], 0] <= centroids[largest[1], 0] else (
            largest[1], largest[0])
        per_side = {"image_left": round(int(areas[first]) * scale), "image_right": round(int(areas[second]) * scale)}
        result["lung_area_px_by_side"] = per_side
    if spacing_mm and spacing_mm[0] > 0 and spacing_mm[1] > 0:
        pixel_mm2 = spacing_mm[0] * spacing_mm[1] * scale
        result["lung_area_mm2"] = total * pixel_mm2
        if per_side:
            result["lung_area_mm2_by_side"] = {"image_left": int(areas[first]) * pixel_mm2,
                                               "image_right": int(areas[second]) * pixel_mm2}
    return result


def side_names(patient_orientation: Sequence[str] | None) -> tuple[str, str]:
    """Names for the lung on the image's left and right.

    With PatientOrientation's row direction ``L`` (standard PA/AP display) the
    image-left lung is the patient's right; with ``R`` the reverse; otherwise
    (rotated, missing) the sides are named by the image.
    """
    row_direction = str(patient_orientation[0]).upper() if patient_orientation else ""
    if row_direction == "L":
        return "right lung", "left lung"
    if row_direction == "R":
        return "left lung", "right lung"
    return "image-left lung", "image-right lung"


def named_lung_areas(mask: np.ndarray, spacing_mm: tuple[float, float] | None, patient_orientation: Any,
                     native_pixels_per_pixel: tuple[float, float] = (1.0, 1.0)) -> dict[str, Any]:
    """The areas as every output names them (the one vocabulary of ``lungseg-segment`` and ``lungseg-edge``):
    ``lung_area_px`` (native pixels), ``lung_area_px_by_lung`` (``right_lung``/``left_lung`` when
    PatientOrientation says which is which, else ``image_left_lung``/``image_right_lung``) and
    ``lung_areas_cm2`` (``total`` and per lung; only with a usable spacing)."""
    areas = lung_areas(mask, spacing_mm, native_pixels_per_pixel)
    left_name, right_name = side_names(patient_orientation)
    keys = {"image_left": left_name.replace(" ", "_").replace("-", "_"),
            "image_right": right_name.replace(" ", "_").replace("-", "_")}
    out: dict[str, Any] = {"lung_area_px": areas["lung_area_px"]}
    if "lung_area_px_by_side" in areas:
        out["lung_area_px_by_lung"] = {keys[k]: v for k, v in areas["lung_area_px_by_side"].items()}
    if "lung_area_mm2" in areas:
        cm2 = {"total": round(areas["lung_area_mm2"] / 100.0, 2)}
        for side, mm2 in areas.get("lung_area_mm2_by_side", {}).items():
            cm2[keys[side]] = round(mm2 / 100.0, 2)
        out["lung_areas_cm2"] = cm2
    return out


def segment_batch(
    predictor: Predictor,
    radiographs: list[Radiograph],
    config: PostprocessConfig | None = None,
) -> list[Segmentation]:
    """Preprocess, infer (one batch) and postprocess each probability map."""
    config = config or PostprocessConfig()
    t0 = time.perf_counter()
    batch, geometries = preprocess_batch([r.pixels for r in radiographs],
                                         native_shapes=[r.source_shape for r in radiographs])
    t1 = time.perf_counter()
    probabilities = predictor.predict(batch)
    t2 = time.perf_counter()
    n = len(radiographs)
    results = []
    for probability, geometry in zip(probabilities, geometries, strict=True):
        t3 = time.perf_counter()
        if config.resolution == "native":
            final = postprocess(geometry.to_native(probability), config)
        else:
            final = postprocess(np.ascontiguousarray(probability[geometry.content]), config)
        qa = artefacts(probability >= config.threshold)
        timings = {
            "preprocess": (t1 - t0) * 1000 / n,
            "infer": (t2 - t1) * 1000 / n,
            "postprocess": (time.perf_counter() - t3) * 1000,
        }
        results.append(Segmentation(final_mask=final, probability=probability, geometry=geometry,
                                    timings_ms=timings, qa={"raw_" + k: v for k, v in qa.items()},
                                    threshold=config.threshold))
    return results
