"""fp32 ONNX -> fp16 ONNX (weights and activations fp16, inputs/outputs kept fp32).

``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)``, with
the final ``Sigmoid`` kept in fp32 besides the converter's default block list: the
mask is ``probability >= 0.5``, and an fp16 sigmoid rounds probabilities near 0.5
to steps of 2^-11, which can push a pixel just below the threshold onto it. The
logits feeding it are computed in fp16 and cast up, so the cost is one Cast.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
from onnxconverter_common import float16

from .onnx_export import set_metadata, validate

log = logging.getLogger(__name__)

FP32_OPS: tuple[str, ...] = ("Sigmoid",)


def convert_fp16(source: Path, target: Path, metadata: Mapping[str, str],
                 keep_fp32_ops: Sequence[str] = FP32_OPS) -> Path:
    """Write the fp16 variant of ``source`` to ``target`` and validate it."""
    model = onnx.load(str(source))
    block_list = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    with warnings.catch_warnings(record=True) as caught:  # one summary line, not one warning per weight
        warnings.simplefilter("always", UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block_list)
    if caught:
        log.info("fp16: %d weights were clamped to the fp16 range (|w| < 1e-7 or > 65504)", len(caught))
    _restore_fp32_outputs(converted)
    set_metadata(converted, {**metadata, "precision": "fp16", "fp16_fp32_ops": ",".join(keep_fp32_ops)})
    onnx.save(converted, str(target))
    validate(target)
    log.info("wrote %s (fp16; kept in fp32: %s)", target, ", ".join(keep_fp32_ops) or "nothing")
    return target


def _restore_fp32_outputs(model: onnx.ModelProto) -> None:
    """Make fp16 graph outputs fp32 again.

    ``keep_io_types`` misses an output produced by a blocked node (here the final
    Sigmoid): the converter appends a Cast to fp16 there. Retargeting that Cast to
    fp32 restores the I/O contract (onnxruntime and TensorRT drop the no-op Cast).
    """
    producers = {name: node for node in model.graph.node for name in node.output}
    for value in model.graph.output:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producers.get(value.name)
        if node is None or node.op_type != "Cast":
            raise ValueError(f"fp16 output {value.name!r} is not produced by a Cast; cannot restore fp32")
        for attribute in node.attribute:
            if attribute.name == "to":
                attribute.i = onnx.TensorProto.FLOAT
        tensor_type.elem_type = onnx.TensorProto.FLOAT
