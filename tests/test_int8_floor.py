"""The int8 floor of lungseg-bench: MACs counted from the ONNX, the ceiling measured on real int8 kernels.

Real OpenVINO (the ``[openvino]`` extra; skipped where it is not installed), real onnx-built models.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                reason="openvino (the [openvino] extra) is not installed")
REPO = Path(__file__).resolve().parents[1]


def conv_and_transpose(path: Path) -> Path:
    """1x2x8x8 -> Conv 2->4 (3x3, pad 1) -> ConvTranspose 4->2 (2x2, stride 2) -> 1x2x16x16."""
    onnx = pytest.importorskip("onnx", reason="onnx (the [train] extra) builds the test model")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("ConvTranspose", ["h", "w2"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
        "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 16, 16])],
        [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((4, 2, 2, 2)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def test_macs_are_counted_per_output_element_of_a_conv_and_per_input_element_of_a_transposed_one(
        tmp_path: Path) -> None:
    from lungseg.benchmarks.int8_ceiling import model_macs

    counted = model_macs(conv_and_transpose(tmp_path / "convs.onnx"))
    conv = (4 * 8 * 8) * (2 * 3 * 3)  # output elements x (input channels x kernel area)
    transpose = (4 * 8 * 8) * (2 * 2 * 2)  # input elements x (output channels x kernel area)
    assert counted["by_op"] == {"Convolution": conv, "ConvolutionBackpropData": transpose}
    assert counted["macs"] == conv + transpose
    assert counted["largest_convs"] == [[[2, 4, 8, 8, 3, 3, 1, 1], conv]]


def test_the_shipped_model_counts_the_same_as_pytorch_counts_it() -> None:
    """Two independent counters agree: OpenVINO's graph of model.onnx and forward hooks on the PyTorch U-Net."""
    pytest.importorskip("torch", reason="torch (the [train] extra) counts the PyTorch model")
    from lungseg.benchmarks.compute import count_conv_flops
    from lungseg.benchmarks.int8_ceiling import model_macs
    from lungseg.nn.unet import UNet

    assert model_macs(REPO / "models" / "default" / "model.onnx")["macs"] == count_conv_flops(UNet())["macs"]


def test_the_ceiling_is_measured_on_int8_kernels_not_an_fp32_fallback() -> None:
    from lungseg.benchmarks.int8_ceiling import against_floor, conv_ceiling

    shapes = [[32, 32, 32, 32, 3, 3, 1, 1], [64, 64, 16, 16, 3, 3, 1, 1]]
    ceiling = conv_ceiling(shapes, threads=1, runs=3)
    assert [m["shape"] for m in ceiling["shapes"]] == shapes
    assert all("I8" in m["kernel"] for m in ceiling["shapes"]), ceiling  # u8 x i8, as NNCF's IR runs
    assert ceiling["ceiling_gmac_per_s"] == max(m["gmac_per_s"] for m in ceiling["shapes"]) > 0
    floor = {"model_gmac": 2.0, "floor_ms_per_image": 10.0}
    assert against_floor(floor, 20.0) == {"gmac_per_s": 100.0, "of_int8_floor": 0.5}
