"""PyTorch -> fp32 ONNX, pinned and self-describing.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``, pinned
to opset 17. It folds BatchNorm into the convolutions, gives a plain
Conv/ConvTranspose/Relu/MaxPool/Concat/Sigmoid graph that onnxruntime, the
onnxruntime quantiser and TensorRT's ONNX parser all take, and it has been stable
for this architecture for years; the newer ``torch.export`` exporter is not needed
for a static U-Net. Batch is dynamic; input ``image`` ``(N, 3, 256, 256)`` float32,
output ``probability`` ``(N, 1, 256, 256)`` float32 (sigmoid inside the graph).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import onnx
import torch

import lungseg
from lungseg.bundle import INPUT_NAME, OUTPUT_NAME
from lungseg.nn.checkpoint import Checkpoint
from lungseg.preprocess import CHANNELS, INPUT_SIZE, PREPROCESSING_PARAMS

from .parity import DEFAULT_THRESHOLD

log = logging.getLogger(__name__)

OPSET = 17
EXPORTER = f"torch.onnx.export(dynamo=False) [TorchScript] torch {torch.__version__.split('+')[0]}"
BATCH_DIM = "batch"


class OnnxValidationError(RuntimeError):
    """An exported file that fails the ONNX checker, shape inference or the I/O contract."""


def bundle_metadata(checkpoint: Checkpoint, precision: str = "fp32") -> dict[str, str]:
    """The ``metadata_props`` every model in a bundle carries (runtime reads them with onnxruntime)."""
    return {
        "model_name": checkpoint.model_name,
        "model_version": checkpoint.model_version,
        "precision": precision,
        "input_size": str(INPUT_SIZE),
        "preprocessing": json.dumps(PREPROCESSING_PARAMS, sort_keys=True),
        "threshold": str(DEFAULT_THRESHOLD),
        "checkpoint_sha256": checkpoint.sha256,
        "init_features": str(checkpoint.init_features),
        "exporter": EXPORTER,
        "opset": str(OPSET),
        "lungseg_version": lungseg.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    """Replace ``model.metadata_props`` with ``metadata`` (all values as strings)."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def export_fp32(checkpoint: Checkpoint, path: Path) -> Path:
    """Export ``checkpoint.model`` to ``path`` (fp32, opset 17, dynamic batch) and validate it."""
    model = checkpoint.model.eval()
    example = torch.zeros(1, CHANNELS, INPUT_SIZE, INPUT_SIZE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
        )
    proto = onnx.load(str(path))
    set_metadata(proto, bundle_metadata(checkpoint))
    onnx.save(proto, str(path))
    validate(path)
    log.info("exported %s (opset %d, %s)", path, OPSET, EXPORTER)
    return path


def validate(path: Path) -> onnx.ModelProto:
    """Full ONNX check, strict shape inference and the bundle's I/O contract; returns the inferred model."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxValidationError(f"{path}: {exc}") from exc
    expected = {
        INPUT_NAME: [BATCH_DIM, CHANNELS, INPUT_SIZE, INPUT_SIZE],
        OUTPUT_NAME: [BATCH_DIM, 1, INPUT_SIZE, INPUT_SIZE],
    }
    found = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in [*inferred.graph.input, *inferred.graph.output]
    }
    for name, shape in expected.items():
        if found.get(name) != shape:
            raise OnnxValidationError(f"{path}: {name} has shape {found.get(name)}, expected {shape}")
    elem_types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.output]}
    if any(elem_types[name] != onnx.TensorProto.FLOAT for name in expected):
        raise OnnxValidationError(f"{path}: inputs/outputs must stay float32 (found {elem_types})")
    return inferred
