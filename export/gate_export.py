"""Add the image gate (``gate.onnx``) and the mask shape model (``shape_model.npz``) to a model bundle.

The gate is re-exported from its training checkpoint, checked against PyTorch on the parity
radiographs (each in the 8 quarter-turn/mirror poses, through :func:`lungseg.gate.gate_input`,
the runtime transform) and recorded with both files' sha256 in ``gate.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from lungseg.bundle import GATE_MANIFEST, GATE_ONNX, sha256_file
from lungseg.errors import LungsegError
from lungseg.gate import (
    GATE_INPUT_NAME,
    GATE_OUTPUT_NAME,
    GATE_SIZE,
    HEADS,
    GateModel,
    consensus_logits,
    dihedral,
    gate_input,
)
from lungseg.nn.gate_net import GATE_VERSION, load_gate_checkpoint, torch_logits
from lungseg.plausibility import SHAPE_MODEL_FILE

log = logging.getLogger(__name__)


class GateExportError(LungsegError, RuntimeError):
    """The gate could not be added (missing checkpoint or shape model, failed parity)."""


def add_gate(bundle: Path, checkpoint: Path, parity_batch: np.ndarray, data: dict[str, Any],
             shape_model: Path | None = None) -> dict[str, Any]:
    """Export the gate into ``bundle``, check parity, copy the shape model, write ``gate.json``."""
    if not checkpoint.is_file():
        raise GateExportError(f"{checkpoint}: no gate checkpoint")
    shape_model = shape_model or checkpoint.parent / SHAPE_MODEL_FILE
    if not shape_model.is_file():
        raise GateExportError(f"{shape_model}: no shape model (fit it with lungseg-train gate --shape-model)")
    try:
        model = load_gate_checkpoint(checkpoint)
    except Exception as exc:
        raise GateExportError(f"{checkpoint}: not a gate checkpoint ({type(exc).__name__}: {exc})") from exc
    onnx_path = export_onnx(model, bundle / GATE_ONNX)
    base = np.stack([gate_input(x) for x in parity_batch])
    poses = np.concatenate([dihedral(base, k, m) for k in range(4) for m in (False, True)])
    parity = check_parity(model, onnx_path, poses, limit=len(poses))
    if not parity["passed"]:  # never leave a failed gate in the bundle: a file without a hash would still load
        onnx_path.unlink(missing_ok=True)
        raise GateExportError(f"gate parity failed: max |d logit| {parity['max_abs_logit_diff']:.2e}, "
                              f"decisions identical {parity['decisions_identical']}")
    parity["source"] = f"{data.get('source', 'parity radiographs')}, {len(base)} images x 8 poses"
    target = bundle / SHAPE_MODEL_FILE
    if shape_model.resolve() != target.resolve():
        shutil.copyfile(shape_model, target)
    trained = checkpoint.parent / GATE_MANIFEST
    training = json.loads(trained.read_text()) if trained.is_file() else {}
    manifest = {
        "name": "lungseg-gate",
        "version": training.get("version", "unknown"),
        "file": GATE_ONNX,
        "sha256": sha256_file(onnx_path),
        "checkpoint_sha256": sha256_file(checkpoint),
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parity": parity,
        "heldout_accuracy": training.get("heldout_accuracy"),
        "policy": training.get("policy"),
        "data": training.get("data"),
        "shape_model": {**(training.get("shape_model") or {}), "file": SHAPE_MODEL_FILE,
                        "sha256": sha256_file(target)},
    }
    (bundle / GATE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_onnx(model: nn.Module, path: Path) -> Path:
    """Export to ONNX (dynamic batch) with the gate version in the metadata; checked with onnx.checker."""
    model = model.eval().to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(1, 1, GATE_SIZE, GATE_SIZE)
    torch.onnx.export(model, (dummy,), str(path), input_names=[GATE_INPUT_NAME], output_names=[GATE_OUTPUT_NAME],
                      dynamic_axes={GATE_INPUT_NAME: {0: "batch"}, GATE_OUTPUT_NAME: {0: "batch"}},
                      opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    for key, value in {"gate_version": GATE_VERSION, "gate_input_size": str(GATE_SIZE),
                       "gate_heads": json.dumps({k: [v.start, v.stop] for k, v in HEADS.items()})}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def check_parity(model: nn.Module, onnx_path: Path, inputs: np.ndarray, limit: int = 256,
                 max_abs: float = 1e-3) -> dict[str, Any]:
    """PyTorch vs onnxruntime logits and decisions on gate inputs, as the policy reads them
    (:func:`lungseg.gate.consensus_logits`)."""
    x = np.asarray(inputs[:limit], dtype=np.float32)
    reference = consensus_logits(lambda b: torch_logits(model, b), x)
    candidate = GateModel(onnx_path).logits(x)
    diff = float(np.abs(reference - candidate).max())
    agree = all(
        np.array_equal(reference[:, s].argmax(1), candidate[:, s].argmax(1)) for s in HEADS.values())
    result = {"n_images": len(x), "source": "held-out gate samples", "max_abs_logit_diff": diff,
              "decisions_identical": bool(agree), "max_abs_allowed": max_abs,
              "passed": bool(diff <= max_abs and agree)}
    log.info("gate parity torch vs onnxruntime: max |d logit| %.2e, decisions identical %s -> %s", diff, agree,
             "pass" if result["passed"] else "FAIL")
    return result
