"""One radiograph in, one native-size lung mask out: the path every front end shares.

The mask is postprocessed at the model's resolution (the letterbox's content region)
and upscaled once, when and to the size it is needed (:attr:`Segmentation.mask` is the
native-size one); areas are measured at model resolution with the spacing scaled to it.
``PostprocessConfig(resolution="native")`` restores 0.1.0's path (probabilities mapped to
native size first, everything measured there) for comparisons.
"""

from __future__ import annotations

import time
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
        return self.mask_at((self.geometry.rows, self.geometry.columns))

    def mask_at(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask resized to ``shape`` (e.g. a reduced-resolution rendering of the source)."""
        if "mask" in self.__dict__ and self.__dict__["mask"].shape == tuple(shape):
            return self.__dict__["mask"]
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
