"""Fit the mask shape model (``shape_model.npz``) on the gate's training patients only.

The PCA is fitted on the ground-truth lung masks of the training split; its thresholds are
calibrated on the segmenter's own masks of training images (what it will score at run time),
never on held-out patients.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from lungseg.bundle import resolve_bundle, sha256_file
from lungseg.data import read_label_mask
from lungseg.imaging import read_image
from lungseg.inference import segment_batch
from lungseg.plausibility import SHAPE_MODEL_FILE, ShapeModel, apex_offset, shape_vector
from lungseg.predictors import OnnxRuntimePredictor
from lungseg.train.gate_data import gate_split

log = logging.getLogger(__name__)


def fit_and_save(manifest: Path, out: Path, model: Path | None = None, calibration_images: int = 300,
                 n_components: int = 12, quantile: float = 0.995, margin: float = 1.25) -> dict:
    """Fit, calibrate, save ``shape_model.npz`` into ``out`` and record it in ``gate.json``."""
    split = gate_split(manifest)
    vectors = []
    for record in split.train:
        lung, valid = read_label_mask(record.mask)
        vectors.append(shape_vector(lung | ~valid))  # "ignore" pixels lie inside the lungs
    shape = ShapeModel.fit(np.stack(vectors), n_components)
    bundle = resolve_bundle(model)
    # the segmenter's masks of training images, reused on refits with the same segmenter and image count
    segmenter_sha = sha256_file(bundle.onnx)
    cache = out / f"shape_calibration_vectors-{segmenter_sha[:16]}-{calibration_images}.npy"
    if cache.is_file():
        predicted = np.load(cache)
    else:
        predictor = OnnxRuntimePredictor(str(bundle.onnx), threads=2)
        rng = np.random.default_rng(0)
        chosen = rng.choice(len(split.train), size=min(calibration_images, len(split.train)), replace=False)
        predicted = np.stack([shape_vector(segment_batch(predictor, [read_image(split.train[int(i)].image)])[0]
                                           .final_mask) for i in chosen])
        np.save(cache, predicted)
    calibration = shape.calibrate(predicted, quantile=quantile, margin=margin)
    offsets = [o for o in (apex_offset(v, shape.size) for v in vectors) if o is not None]
    predicted_offsets = [o for o in (apex_offset(v, shape.size) for v in predicted) if o is not None]
    # the same margin as the other checks, over the largest offset of any training mask or of the
    # segmenter's own mask of a training image
    shape.apex_threshold = margin * max(float(np.max(offsets)), float(np.max(predicted_offsets)))
    calibration["apex_threshold"] = shape.apex_threshold
    calibration["apex_offset_max_training_masks"] = float(np.max(offsets))
    calibration["apex_offset_max_segmenter_masks"] = float(np.max(predicted_offsets))
    path = out / SHAPE_MODEL_FILE
    shape.save(path)
    record = {"file": SHAPE_MODEL_FILE, "sha256": sha256_file(path), "size": shape.size,
              "n_components": len(shape.variances), "fitted_on_masks": len(vectors),
              "calibrated_on_predictions": calibration, "segmenter": f"{bundle.name} {bundle.version}",
              "segmenter_onnx_sha256": segmenter_sha}
    manifest_path = out / "gate.json"
    if manifest_path.is_file():
        data = json.loads(manifest_path.read_text())
        data["shape_model"] = record
        manifest_path.write_text(json.dumps(data, indent=2) + "\n")
    log.info("shape model: %s", record)
    return record
