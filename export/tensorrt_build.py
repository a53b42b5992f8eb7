"""Build a bundle's TensorRT FP16 engine and its ``engine.json`` (TensorRT 10.x Python API).

Needs ``tensorrt`` and a CUDA GPU, nothing else (no torch, no onnx), so the edge
runtime can rebuild an engine on the device it runs on. The steps, TensorRT 10.x:
``Builder(logger).create_network(0)`` (explicit batch is the only mode in 10.x),
``OnnxParser(network, logger).parse_from_file(model.onnx)``,
``config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``,
``config.set_flag(BuilderFlag.FP16)``, one optimisation profile for the dynamic
batch (min/opt/max), a timing cache loaded with ``create_timing_cache`` and saved
with ``serialize`` so later builds on the same GPU skip tactic timing, then
``build_serialized_network``.

TensorRT 11 removed ``BuilderFlag.FP16`` (weak typing); where the flag is absent the
engine is built as a strongly typed network from ``model.fp16.onnx``, whose graph
already carries the precision. That path is untested (no TensorRT 11 here).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lungseg
from lungseg import tensorrt_runtime
from lungseg.bundle import ENGINE_FP16, ENGINE_MANIFEST, INPUT_NAME, ONNX_FP16, ONNX_FP32, sha256_file
from lungseg.preprocess import CHANNELS, INPUT_SIZE

log = logging.getLogger(__name__)

DEFAULT_PROFILE = (1, 1, 8)
DEFAULT_WORKSPACE_MB = 1024


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build the engine; the message says why."""


@dataclass(frozen=True)
class EngineSettings:
    """Build settings recorded in ``engine.json`` (so a rebuild reproduces them)."""

    profile: tuple[int, int, int] = DEFAULT_PROFILE
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    timing_cache: Path | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> EngineSettings:
        profile = manifest.get("profile", {})
        return cls(
            profile=(int(profile.get("min", 1)), int(profile.get("opt", 1)), int(profile.get("max", 8))),
            workspace_mb=int(manifest.get("workspace_mb", DEFAULT_WORKSPACE_MB)),
        )


def parse_profile(text: str) -> tuple[int, int, int]:
    """``"1,1,8"`` -> ``(1, 1, 8)``; min <= opt <= max, all >= 1."""
    try:
        low, opt, high = (int(v) for v in text.split(","))
    except ValueError as exc:
        raise ValueError(f"profile {text!r} is not MIN,OPT,MAX (e.g. 1,1,8)") from exc
    if not 1 <= low <= opt <= high:
        raise ValueError(f"profile {text!r} needs 1 <= MIN <= OPT <= MAX")
    return low, opt, high


def default_timing_cache(trt_version: str, gpu_name: str) -> Path:
    """``$XDG_CACHE_HOME/lungseg/tensorrt/<version>-<gpu>.timing`` (one cache per TensorRT + GPU)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{trt_version}-{gpu_name}").strip("-")
    return root / "lungseg" / "tensorrt" / f"{slug}.timing"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def build_engine(bundle_dir: Path, settings: EngineSettings | None = None) -> dict[str, Any]:
    """Build ``model.fp16.engine`` in ``bundle_dir``, write ``engine.json``, return the manifest."""
    settings = settings or EngineSettings()
    trt = tensorrt_runtime.import_tensorrt()
    gpu_name, capability = tensorrt_runtime.cuda_device()
    weakly_typed = hasattr(trt.BuilderFlag, "FP16")  # TensorRT 10.x
    onnx_path = bundle_dir / (ONNX_FP32 if weakly_typed else ONNX_FP16)
    if not onnx_path.is_file():
        raise EngineBuildError(f"{onnx_path}: not found (export the bundle first)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if weakly_typed else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if weakly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    low, opt, high = settings.profile
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *((n, CHANNELS, INPUT_SIZE, INPUT_SIZE) for n in (low, opt, high)))
    config.add_optimization_profile(profile)
    cache_path = settings.timing_cache or default_timing_cache(trt.__version__, gpu_name)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not fit this TensorRT/GPU; starting a new one", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    log.info("building TensorRT %s FP16 engine for %s (sm %s) from %s", trt.__version__, gpu_name,
             capability, onnx_path.name)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError("build_serialized_network returned nothing (see the TensorRT log above)")
    engine_path = bundle_dir / ENGINE_FP16
    _write_atomic(engine_path, bytes(serialized))
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    except OSError as exc:
        log.warning("could not save the TensorRT timing cache %s: %s", cache_path, exc)

    manifest = {
        "engine_file": ENGINE_FP16,
        "engine_sha256": sha256_file(engine_path),
        "precision": "fp16",
        "typing": "weak (BuilderFlag.FP16)" if weakly_typed else "strong (fp16 ONNX)",
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu_name,
        "compute_capability": capability,
        "profile": {"input": INPUT_NAME, "min": low, "opt": opt, "max": high},
        "workspace_mb": settings.workspace_mb,
        "timing_cache": cache_path.name,
        "lungseg_version": lungseg.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_atomic(bundle_dir / ENGINE_MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    log.info("wrote %s and %s", engine_path, ENGINE_MANIFEST)
    return manifest

