"""One radiograph in, one native-size lung mask out: the path every front end shares."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lungseg.imaging import Radiograph
from lungseg.postprocess import PostprocessConfig, artefacts, label_components, postprocess
from lungseg.predictors import Predictor
from lungseg.preprocess import Geometry, preprocess_batch


@dataclass
class Segmentation:
    """A radiograph's lung mask at native size, plus what was measured on the way."""

    mask: np.ndarray
    probability: np.ndarray
    geometry: Geometry
    timings_ms: dict[str, float] = field(default_factory=dict)
    qa: dict[str, Any] = field(default_factory=dict)


def lung_areas(mask: np.ndarray, spacing_mm: tuple[float, float] | None) -> dict[str, Any]:
    """Total and per-lung areas in pixels, and in mm² when spacing is usable.

    Lungs are the two largest components; the one whose centroid lies left in the
    image is reported as ``image_left`` (the patient's right lung on a PA/AP view).
    """
    count, labels, areas = label_components(mask)
    result: dict[str, Any] = {"lung_area_px": int(np.count_nonzero(mask))}
    per_side: dict[str, int] = {}
    if count >= 2:
        largest = np.argsort(areas)[::-1][:2] + 1
        cols = [float(np.nonzero(labels == lab)[1].mean()) for lab in largest]
        left, right = (largest[0], largest[1]) if cols[0] <= cols[1] else (largest[1], largest[0])
        per_side = {"image_left": int(np.count_nonzero(labels == left)),
                    "image_right": int(np.count_nonzero(labels == right))}
        result["lung_area_px_by_side"] = per_side
    if spacing_mm and spacing_mm[0] > 0 and spacing_mm[1] > 0:
        pixel_mm2 = spacing_mm[0] * spacing_mm[1]
        result["lung_area_mm2"] = result["lung_area_px"] * pixel_mm2
        if per_side:
            result["lung_area_mm2_by_side"] = {k: v * pixel_mm2 for k, v in per_side.items()}
    return result


def segment_batch(
    predictor: Predictor,
    radiographs: list[Radiograph],
    config: PostprocessConfig | None = None,
) -> list[Segmentation]:
    """Preprocess, infer (one batch), postprocess and map each mask back to native size."""
    config = config or PostprocessConfig()
    t0 = time.perf_counter()
    batch, geometries = preprocess_batch([r.pixels for r in radiographs])
    t1 = time.perf_counter()
    probabilities = predictor.predict(batch)
    t2 = time.perf_counter()
    n = len(radiographs)
    results = []
    for probability, geometry in zip(probabilities, geometries, strict=True):
        t3 = time.perf_counter()
        native_probability = geometry.to_native(probability)
        mask = postprocess(native_probability, config)
        qa = artefacts(probability >= config.threshold)
        timings = {
            "preprocess": (t1 - t0) * 1000 / n,
            "infer": (t2 - t1) * 1000 / n,
            "postprocess": (time.perf_counter() - t3) * 1000,
        }
        results.append(Segmentation(mask=mask, probability=probability, geometry=geometry,
                                    timings_ms=timings, qa={"raw_" + k: v for k, v in qa.items()}))
    return results
