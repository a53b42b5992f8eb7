"""The int8 floor of this CPU for this model: how close each CPU backend comes to it, measured in the same run.

``model_macs`` counts the multiply-accumulates of one image from the exported ONNX (OpenVINO reads it:
no torch, no onnx needed) - every Convolution (output elements x input channels per group x kernel area)
and ConvolutionBackpropData (input elements x output channels x kernel area). ``conv_ceiling`` builds,
for each distinct convolution shape of the model, a one-layer int8 model (u8 in, i8 weights, ReLU, u8
out: the pattern NNCF's export leaves) and times only that convolution in OpenVINO's CPU plugin (its
per-layer counters, median of ``runs``): the rate of the best kernels available to lungseg on this CPU
(oneDNN's VNNI/AMX paths), not a datasheet peak. ``ceiling_gmac_per_s`` is the best of those rates and
``floor_ms_per_image`` = the model's MACs / that ceiling: every convolution at the best rate measured and
nothing else costing anything (no pooling, concatenation or memory traffic between layers), a bound no
int8 CPU backend on this machine gets under. The per-shape rates are kept for diagnosis.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.openvino_runtime import openvino_installed

RUNS = 15


def _shape(port: Any) -> list[int]:
    return [int(d) for d in port.get_shape()]


def model_macs(onnx_path: Path, core: Any | None = None) -> dict[str, Any]:
    """MACs of one image through ``onnx_path`` (batch fixed at 1): in total, by operator, and
    ``largest_convs``: ``[shape, MACs]`` per distinct Convolution shape, largest first."""
    import openvino as ov  # the [openvino] extra; the caller checks it is installed

    core = core or ov.Core()
    model = core.read_model(str(onnx_path))
    shape = model.input(0).get_partial_shape()
    shape[0] = 1
    model.reshape({model.input(0): shape})
    by_op = {"Convolution": 0, "ConvolutionBackpropData": 0}
    convs: dict[tuple[int, ...], int] = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Convolution":
            weights, out = _shape(op.input(1)), _shape(op.output(0))
            macs = int(np.prod(out[1:])) * int(np.prod(weights[1:]))
            # (input channels, output channels, output H, W, kernel H, W, stride H, W)
            key = (weights[1], weights[0], out[2], out[3], weights[2], weights[3], *op.get_strides())
            convs[key] = convs.get(key, 0) + macs
        elif kind == "ConvolutionBackpropData":
            weights, inp = _shape(op.input(1)), _shape(op.input(0))  # weights: (C in, C out, kH, kW)
            macs = int(np.prod(inp[1:])) * weights[1] * weights[2] * weights[3]
        elif kind in ("GroupConvolution", "GroupConvolutionBackpropData", "MatMul"):
            raise ValueError(f"{onnx_path.name}: {kind} is not counted (the U-Net has none)")
        else:
            continue
        by_op[kind] += macs
    return {"macs": sum(by_op.values()), "by_op": by_op,
            "largest_convs": [[list(k), m] for k, m in sorted(convs.items(), key=lambda kv: -kv[1])]}


def _int8_conv(cin: int, cout: int, height: int, width: int, kh: int, kw: int, sh: int, sw: int) -> Any:
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, cin, (height - 1) * sh + kh - 2 * (kh // 2), (width - 1) * sw + kw - 2 * (kw // 2)],
                      np.float32, name="x")
    lo, hi = ops.constant(np.float32(0.0)), ops.constant(np.float32(2.55))
    activations = ops.fake_quantize(x, lo, hi, lo, hi, 256)  # u8
    w = (np.random.default_rng(0).standard_normal((cout, cin, kh, kw)) * 0.05).astype(np.float32)
    wl, wh = ops.constant(np.float32(-0.254)), ops.constant(np.float32(0.254))
    weights = ops.fake_quantize(ops.constant(w), wl, wh, wl, wh, 255)  # i8
    pads = [kh // 2, kw // 2]
    y = ops.relu(ops.convolution(activations, weights, [sh, sw], pads, pads, [1, 1]))
    top = ops.constant(np.float32(8.0))
    return ov.Model([ops.fake_quantize(y, lo, top, lo, top, 256)], [x], "int8_conv")  # u8 out, fused


def conv_ceiling(shapes: list[list[int]], threads: int, runs: int = RUNS, core: Any | None = None
                 ) -> dict[str, Any]:
    """The best int8 rate (GMAC/s) of OpenVINO's CPU plugin over ``shapes`` (see the module docstring)."""
    import openvino as ov

    core = core or ov.Core()
    measured = []
    for shape in shapes:
        cin, cout, height, width, kh, kw = shape[:6]
        compiled = core.compile_model(_int8_conv(*shape), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True})
        request = compiled.create_infer_request()
        x = np.random.default_rng(1).random(_shape(compiled.input(0)), dtype=np.float32)
        for _ in range(3):
            request.infer({0: x})
        seconds, kernel = [], ""
        for _ in range(runs):
            request.infer({0: x})
            convs = [p for p in request.profiling_info if p.node_type == "Convolution"]
            seconds.append(sum(p.real_time.total_seconds() for p in convs))
            kernel = ",".join(sorted({p.exec_type for p in convs}))
        macs = cout * height * width * cin * kh * kw
        measured.append({"shape": shape, "gmac_per_s": macs / statistics.median(seconds) / 1e9, "kernel": kernel})
    best = max(measured, key=lambda m: m["gmac_per_s"])
    return {"ceiling_gmac_per_s": best["gmac_per_s"], "kernel": best["kernel"], "shapes": measured}



def int8_floor(onnx_path: Path, threads: int) -> dict[str, Any]:
    """The model's MACs, this CPU's measured int8 ceiling and the floor they give; ``skipped`` without OpenVINO."""
    if not openvino_installed():
        return {"skipped": "openvino is not installed (the [openvino] extra measures the int8 ceiling)"}
    import openvino as ov

    core = ov.Core()
    counted = model_macs(onnx_path, core)
    ceiling = conv_ceiling([shape for shape, _ in counted["largest_convs"]], threads, core=core)
    floor_ms = counted["macs"] / (ceiling["ceiling_gmac_per_s"] * 1e9) * 1000.0
    return {"model_gmac": counted["macs"] / 1e9, "by_op_gmac": {k: v / 1e9 for k, v in counted["by_op"].items()},
            **ceiling, "floor_ms_per_image": floor_ms, "threads": threads, "runtime": f"openvino {ov.__version__}"}


def against_floor(floor: dict[str, Any], ms_per_image: float) -> dict[str, float]:
    """A backend's rate (GMAC/s) and how close it comes to the int8 floor (floor ms / its ms), from its ms."""
    return {"gmac_per_s": floor["model_gmac"] / (ms_per_image / 1000.0),
            "of_int8_floor": floor["floor_ms_per_image"] / ms_per_image}


__all__ = ["against_floor", "conv_ceiling", "int8_floor", "model_macs"]
