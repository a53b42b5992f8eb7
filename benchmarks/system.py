"""The machine and software a benchmark ran on (recorded in every report)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from lungseg.predictors import BackendUnavailableError
from lungseg.tensorrt_runtime import cuda_device

PACKAGES = ("lungseg", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "tensorrt", "cuda-python",
            "opencv-python-headless", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "glymur", "highdicom",
            "onnxconverter-common")


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp",
                "sve", "i8mm", "bf16")


def cpu_features() -> list[str]:
    """The SIMD feature flags (x86 ``flags`` / ARM ``Features`` in ``/proc/cpuinfo``) that matter for
    int8/bf16/fp32 kernels, in :data:`CPU_FEATURES` order; ``[]`` where they cannot be read."""
    cpuinfo = Path("/proc/cpuinfo")
    found: set[str] = set()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                found.update(value.split())
    if "asimd" in found:
        found.add("neon")
    return [flag for flag in CPU_FEATURES if flag in found]


def gpu() -> dict[str, Any]:
    """The CUDA GPU, or why there is none."""
    try:
        name, capability = cuda_device()
    except BackendUnavailableError as exc:
        return {"present": False, "reason": str(exc)}
    return {"present": True, "name": name, "compute_capability": capability}


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter (absent ones left out)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def machine(threads: int) -> dict[str, Any]:
    """CPU, cores, threads used, memory, OS and GPU."""
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "threads": threads,
        "memory_gib": round(pages * page_size / 2**30, 1) if pages and page_size else None,
        "os": f"{platform.system()} {platform.release()}",
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": gpu(),
    }
