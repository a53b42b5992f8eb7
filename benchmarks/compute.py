"""How much arithmetic the U-Net needs and how fast this machine multiplies: a latency floor.

FLOPs are counted from the model itself with forward hooks: 2 x the
multiply-accumulates of every Conv2d and ConvTranspose2d (BatchNorm is folded
into the convolutions at export; ReLU, pooling, concatenation and the sigmoid
are ignored: well under 1 %). The machine's rate is a float32 GEMM
(numpy, and torch with the benchmark's thread count); ``floor_ms`` is
FLOPs / best rate, the time the convolutions would take at GEMM speed.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np


def count_conv_flops(model: Any, size: int = 256, channels: int = 3) -> dict[str, Any]:
    """Multiply-accumulates and FLOPs (2 x MACs) of one ``size`` x ``size`` image.

    Runs a copy of ``model`` on the ``meta`` device: shapes only, no arithmetic.
    """
    import torch  # the [train] extra; loaded only when there is a model to count
    from torch import nn

    parameters = int(sum(p.numel() for p in model.parameters()))
    model = copy.deepcopy(model).to("meta").eval()
    macs: dict[str, int] = {"Conv2d": 0, "ConvTranspose2d": 0}

    def conv_hook(module: nn.Conv2d, _inputs: Any, output: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        macs["Conv2d"] += output.numel() * (module.in_channels // module.groups) * kh * kw

    def transpose_hook(module: nn.ConvTranspose2d, inputs: Any, _output: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        macs["ConvTranspose2d"] += inputs[0].numel() * (module.out_channels // module.groups) * kh * kw

    handles = []
    for module in model.modules():
        if isinstance(module, nn.ConvTranspose2d):
            handles.append(module.register_forward_hook(transpose_hook))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, channels, size, size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    total = sum(macs.values())
    return {"image_size": size, "macs": total, "flops": 2 * total, "gflops": 2 * total / 1e9,
            "macs_by_layer_type": macs,
            "parameters": parameters}


def gemm_gflops(threads: int, n: int = 1024, repeats: int = 5) -> dict[str, Any]:
    """Best-of-``repeats`` float32 GEMM rate (GFLOP/s) of numpy and, when installed, torch."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    result: dict[str, Any] = {"n": n, "numpy": flops / _best(lambda: a @ b, repeats) / 1e9}
    try:  # the [train] extra: numpy's rate alone without it
        import torch
    except ImportError:
        result["torch"] = None
        return result
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    result["torch"] = flops / _best(lambda: ta @ tb, repeats) / 1e9
    result["torch_threads"] = threads
    torch.set_num_threads(previous)
    return result


def _best(fn: Any, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def latency_floor(flops: float, rates: dict[str, Any]) -> dict[str, Any]:
    """FLOPs / the best measured GEMM rate, in milliseconds per image."""
    best = max(v for k, v in rates.items() if k in ("numpy", "torch") and v)
    return {"best_gemm_gflops": best, "floor_ms_per_image": flops / (best * 1e9) * 1000.0}
