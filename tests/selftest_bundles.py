"""Real model bundles for the self-test, demotion and TensorRT tests (built once per test session).

The shipped fp32 model, an int8 quantised here with the export's default options,
a golden set from committed fixtures with onnxruntime fp32 as the reference, and
``bundle.json``. ``break_int8`` negates the logit layer of the int8 model (a
deliberately broken quantisation whose masks are inverted) and re-writes the
manifest, as a faulty export would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from lungseg.bundle import ONNX_FP16, ONNX_FP32, ONNX_INT8, default_bundle_dir, write_bundle_manifest
from lungseg.export.parity import predict_in_chunks
from lungseg.export.samples import load_samples, model_batch
from lungseg.predictors import OnnxRuntimePredictor
from lungseg.selftest import write_golden

GOLDEN_IDS = ("0e132bd64729", "355c06b0444a", "05878ee1390b", "ead2c3ca8955")


def fixture_inputs() -> tuple[list[str], np.ndarray]:
    samples = load_samples(None, with_masks=False)
    return [s.id for s in samples], model_batch(samples)[0]


def build_bundle(dest: Path, *, int8: bool = True, fp16: bool = False) -> Path:
    """A bundle folder in ``dest`` (see the module docstring)."""
    from lungseg.export.int8 import QuantOptions, quantize_int8

    dest.mkdir(parents=True, exist_ok=True)
    shipped = default_bundle_dir()
    shutil.copyfile(shipped / ONNX_FP32, dest / ONNX_FP32)
    if fp16:
        shutil.copyfile(shipped / ONNX_FP16, dest / ONNX_FP16)
    ids, batch = fixture_inputs()
    golden = [ids.index(i) for i in GOLDEN_IDS]
    calibration = [i for i in range(len(ids)) if i not in golden][:6]
    reference = OnnxRuntimePredictor(str(dest / ONNX_FP32), threads=2)
    write_golden(dest / "golden.npz", GOLDEN_IDS, batch[golden], lambda x: predict_in_chunks(reference.predict, x))
    if int8:
        quantize_int8(dest / ONNX_FP32, dest / ONNX_INT8, batch[calibration], {}, QuantOptions())
    write_bundle_manifest(dest)
    return dest


def break_int8(bundle: Path, dest: Path) -> Path:
    """Copy ``bundle`` to ``dest`` with the int8 model's last convolution negated (masks inverted)."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(bundle, dest)
    model = onnx.load(str(dest / ONNX_INT8))
    last_conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    initializers = {init.name: init for init in model.graph.initializer}
    for name in last_conv.input[1:]:
        if name in initializers:
            tensor = initializers[name]
            tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), name))
    onnx.save(model, str(dest / ONNX_INT8))
    write_bundle_manifest(dest)
    return dest


def build_tiny_bundle(dest: Path) -> Path:
    """A fast bundle for the TensorRT tests: an untrained UNet(init_features=4) whose logits are centred on the
    fixtures (large masks, most pixels far from 0.5), its fp16 variant and a golden set; no int8."""
    from lungseg.export.fp16 import convert_fp16
    from lungseg.export.onnx_export import bundle_metadata, export_fp32
    from lungseg.nn.checkpoint import load_checkpoint, random_checkpoint

    dest.mkdir(parents=True, exist_ok=True)
    ids, batch = fixture_inputs()
    checkpoint = load_checkpoint(random_checkpoint(dest / "checkpoint.pt", init_features=4, centre_on=batch[:8]))
    fp32 = export_fp32(checkpoint, dest / ONNX_FP32)
    convert_fp16(fp32, dest / ONNX_FP16, bundle_metadata(checkpoint, "fp16"))
    (dest / "checkpoint.pt").unlink()
    golden = [ids.index(i) for i in GOLDEN_IDS]
    reference = OnnxRuntimePredictor(str(fp32), threads=2)
    write_golden(dest / "golden.npz", GOLDEN_IDS, batch[golden], lambda x: predict_in_chunks(reference.predict, x))
    write_bundle_manifest(dest)
    return dest
