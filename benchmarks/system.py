"""The machine and software a benchmark ran on (recorded in every report)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("lungseg", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "tensorrt", "cuda-python",
            "opencv-python-headless", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg", "onnxconverter-common")


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


def gpu() -> dict[str, Any]:
    """The CUDA GPU, or why there is none."""
    from lungseg.predictors import BackendUnavailableError
    from lungseg.tensorrt_runtime import cuda_device

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
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "threads": threads,
        "memory_gib": round(pages * page_size / 2**30, 1) if pages and page_size else None,
        "os": f"{platform.system()} {platform.release()}",
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": gpu(),
    }
