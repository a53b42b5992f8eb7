"""Check lungseg's CUDA memory code on a real GPU, without TensorRT: ``python -m lungseg.benchmarks.gpu_selfcheck``.

Exercises :mod:`lungseg.cuda_memory` (the code the TensorRT runtime uses) through
cuda-python: device identity, device + pinned host buffers sized like the engine's
optimisation profile, host->device->host copies that must round-trip exactly,
stream creation and destruction, the error path of an absurd allocation (and
that the GPU stays usable after it), and a CUDA graph capturing the copies, as
the runtime does for batch 1. Writes ``gpu_selfcheck.json`` into ``--out``.

Exit codes: 0 every check passed; 1 a check failed (see the JSON); 2 usage error;
3 no CUDA device (or cuda-python missing): nothing to check here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from lungseg import cuda_memory as cm

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
PROFILE_MAX_BATCH = 8
IMAGE_FLOATS = 3 * 256 * 256
OUTPUT_FLOATS = 256 * 256
ABSURD_BYTES = 1 << 50  # 1 PiB


def _step(results: list[dict[str, Any]], name: str, fn: Callable[[], dict[str, Any] | None]) -> bool:
    start = time.perf_counter()
    entry: dict[str, Any] = {"name": name}
    try:
        detail = fn() or {}
        entry.update(passed=bool(detail.pop("passed", True)), **detail)
    except Exception as exc:  # every failure is a result, never a crash: the JSON must be written
        entry.update(passed=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=4))
    entry["seconds"] = round(time.perf_counter() - start, 4)
    results.append(entry)
    return bool(entry["passed"])


def _versions(rt: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for package in ("cuda-python", "cuda-bindings"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    for key, call in (("driver_version", "cudaDriverGetVersion"), ("runtime_version", "cudaRuntimeGetVersion")):
        try:
            result = getattr(rt, call)()
            info[key] = int(result[1]) if result[0] == rt.cudaError_t.cudaSuccess else str(result[0])
        except Exception as exc:  # optional information
            info[key] = f"unavailable ({exc})"
    return info


def run_checks() -> tuple[int, dict[str, Any]]:
    """All checks; returns ``(exit code, report)``."""
    report: dict[str, Any] = {"tool": "lungseg.benchmarks.gpu_selfcheck", "checks": []}
    try:
        rt = cm.import_cudart()
        identity = cm.device_identity(0)
    except (cm.CudaUnavailableError, cm.CudaError) as exc:
        report.update(passed=False, no_cuda=True, reason=f"no CUDA device: {exc}")
        return EXIT_NO_CUDA, report
    report["device"] = identity.to_dict()
    report["versions"] = _versions(rt)
    results: list[dict[str, Any]] = report["checks"]
    sizes = {"image": PROFILE_MAX_BATCH * IMAGE_FLOATS * 4, "probability": PROFILE_MAX_BATCH * OUTPUT_FLOATS * 4}
    rng = np.random.default_rng(0)

    def roundtrip() -> dict[str, Any]:
        io = cm.IOBuffers(sizes, rt)
        try:
            detail: dict[str, Any] = {"buffer_bytes": sizes}
            for name, floats in (("image", PROFILE_MAX_BATCH * IMAGE_FLOATS), ("probability", 3 * OUTPUT_FLOATS)):
                data = rng.standard_normal(floats).astype(np.float32)
                io.stage(name, data)
                start = time.perf_counter()
                io.upload(name, data.nbytes)
                io.synchronize()
                h2d = time.perf_counter() - start
                io.host[name].array[:] = 0.0  # prove the data comes back from the device
                start = time.perf_counter()
                io.download(name, data.nbytes)
                io.synchronize()
                d2h = time.perf_counter() - start
                back = io.result(name, data.size)
                if not np.array_equal(back, data):
                    return {"passed": False, "error": f"{name}: {int(np.count_nonzero(back != data))} floats differ "
                                                      "after host->device->host"}
                detail[f"{name}_h2d_GBps"] = round(data.nbytes / h2d / 1e9, 2)
                detail[f"{name}_d2h_GBps"] = round(data.nbytes / d2h / 1e9, 2)
            return detail
        finally:
            io.close()

    def stream_lifetime() -> dict[str, Any]:
        streams = [cm.Stream(rt) for _ in range(4)]
        handles = [s.handle for s in streams]
        for stream in streams:
            stream.synchronize()
            stream.close()
            stream.close()  # idempotent
        try:
            _ = streams[0].handle
        except cm.CudaError:
            return {"streams": len(handles), "distinct": len(set(handles)) == len(handles)}
        return {"passed": False, "error": "a destroyed stream still gave a handle"}

    def absurd_allocation() -> dict[str, Any]:
        try:
            buffer = cm.DeviceBuffer(rt, ABSURD_BYTES)
        except cm.CudaError as exc:
            error = str(exc)
        else:
            buffer.close()
            return {"passed": False, "error": f"cudaMalloc({ABSURD_BYTES}) succeeded"}
        ok = cm.DeviceBuffer(rt, 1 << 20)  # the GPU must still work after the failure
        ok.close()
        return {"error_seen": error, "passed": "cudaErrorMemoryAllocation" in error}

    def absurd_pinned() -> dict[str, Any]:
        try:
            buffer = cm.PinnedBuffer(rt, ABSURD_BYTES)
        except cm.CudaError as exc:
            return {"error_seen": str(exc)}
        buffer.close()
        return {"passed": False, "error": f"cudaMallocHost({ABSURD_BYTES}) succeeded"}

    def graph_capture() -> dict[str, Any]:
        io = cm.IOBuffers({"image": IMAGE_FLOATS * 4}, rt)
        graph = graph_exec = None
        try:
            assert io.stream is not None
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            cm.check(rt, "cudaStreamBeginCapture", rt.cudaStreamBeginCapture(io.stream.raw, mode))
            try:
                io.upload("image", IMAGE_FLOATS * 4)
                io.download("image", IMAGE_FLOATS * 4)
            finally:
                graph = cm.check(rt, "cudaStreamEndCapture", rt.cudaStreamEndCapture(io.stream.raw))
            graph_exec = cm.check(rt, "cudaGraphInstantiate", rt.cudaGraphInstantiate(graph, 0))
            data = rng.standard_normal(IMAGE_FLOATS).astype(np.float32)
            io.stage("image", data)
            cm.check(rt, "cudaGraphLaunch", rt.cudaGraphLaunch(graph_exec, io.stream.raw))
            io.synchronize()
            return {"passed": bool(np.array_equal(io.result("image", IMAGE_FLOATS), data))}
        finally:
            if graph_exec is not None:
                cm.check(rt, "cudaGraphExecDestroy", rt.cudaGraphExecDestroy(graph_exec))
            if graph is not None:
                cm.check(rt, "cudaGraphDestroy", rt.cudaGraphDestroy(graph))
            io.close()

    def repeated_setup() -> dict[str, Any]:
        for _ in range(5):  # the runtime creates and releases these on every demotion/reload
            cm.IOBuffers(sizes, rt).close()
        return {"cycles": 5}

    for name, fn in (("roundtrip_profile_buffers", roundtrip), ("stream_lifetime", stream_lifetime),
                     ("absurd_device_allocation", absurd_allocation), ("absurd_pinned_allocation", absurd_pinned),
                     ("cuda_graph_capture", graph_capture), ("repeated_setup_teardown", repeated_setup)):
        _step(results, name, fn)
    report["passed"] = all(r["passed"] for r in results)
    return (EXIT_OK if report["passed"] else EXIT_FAILED), report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lungseg.benchmarks.gpu_selfcheck",
        description="Exercise lungseg's cuda-python buffer, stream and pinned-memory code on this machine's GPU "
        "(no TensorRT needed) and write gpu_selfcheck.json.",
        epilog=f"exit codes: {EXIT_OK} all checks passed; {EXIT_FAILED} a check failed; {EXIT_USAGE} usage error; "
        f"{EXIT_NO_CUDA} no CUDA device or no cuda-python (nothing checked)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for gpu_selfcheck.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"gpu_selfcheck: cannot create {args.out}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        code, report = run_checks()
    except Exception as exc:  # still leave a JSON behind
        code, report = EXIT_FAILED, {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()}
    report["exit_code"] = code
    path = args.out / "gpu_selfcheck.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if code == EXIT_NO_CUDA:
        print(f"gpu_selfcheck: {report['reason']} (exit {EXIT_NO_CUDA}); wrote {path}", file=sys.stderr)
    else:
        for check in report.get("checks", []):
            print(f"{'PASS' if check['passed'] else 'FAIL'} {check['name']} ({check['seconds']} s)"
                  + (f": {check.get('error')}" if not check["passed"] else ""), file=sys.stderr)
        print(f"gpu_selfcheck: {'passed' if code == EXIT_OK else 'FAILED'}; wrote {path}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
