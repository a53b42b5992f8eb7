"""fp32 ONNX -> OpenVINO int8 IR by NNCF post-training quantisation (the ``[openvino]`` extra).

``nncf.quantize`` with the ``performance`` preset (symmetric int8 weights and activations), calibrated on
real radiographs drawn round-robin over the manifest's (view, portable) groups — portable AP, PA and
paediatric — from patients that have no image in the parity set (:func:`patient_disjoint_calibration`).
The IR (``model.openvino.int8.xml`` + ``.bin``) is written with fp32 weights storage; ``bundle.json``
hashes both files. Parity is measured by the caller on held-out images (never calibration ones).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.data import load_manifest
from lungseg.openvino_runtime import OPENVINO_INT8_BIN, OPENVINO_INT8_XML

from .int8 import stratified_calibration

log = logging.getLogger(__name__)

PRESET = "performance"
REQUIRED = (0.995, 0.98)  # mean and worst-image mask Dice vs the reference on held-out images


def patient_disjoint_calibration(manifest: Path, parity_ids: set[str], limit: int) -> tuple[np.ndarray, list[str]]:
    """Up to ``limit`` stratified calibration inputs from patients with no image among ``parity_ids``."""
    records = load_manifest(manifest)
    parity_patients = {r.patient_id for r in records if r.id in parity_ids}
    held_out = {r.id for r in records if r.id in parity_ids or r.patient_id in parity_patients}
    return stratified_calibration(manifest, held_out, limit)


def quantize_openvino_int8(source: Path, out_dir: Path, calibration: np.ndarray) -> dict[str, Any]:
    """Write ``model.openvino.int8.xml``/``.bin`` into ``out_dir`` from the fp32 ONNX ``source``."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise RuntimeError(f"the OpenVINO int8 export needs openvino and nncf: pip install 'lungseg[openvino]' "
                           f"nncf ({exc})") from exc
    model = ov.Core().read_model(str(source))
    dataset = nncf.Dataset([image[None].astype(np.float32) for image in calibration])
    quantized = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                              subset_size=len(calibration))
    xml = out_dir / OPENVINO_INT8_XML
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    log.info("wrote %s (NNCF %s preset, calibrated on %d images)", xml, PRESET, len(calibration))
    return {"files": [OPENVINO_INT8_XML, OPENVINO_INT8_BIN], "preset": PRESET, "calibration_images": len(calibration),
            "openvino_version": ov.__version__, "nncf_version": nncf.__version__}


__all__ = ["PRESET", "REQUIRED", "patient_disjoint_calibration", "quantize_openvino_int8"]
