"""Is nvImageCodec's decode of JPEG 2000 / HTJ2K DICOM files right, and how fast? ``python -m
lungseg.benchmarks.gpu_decode_check FILE_OR_DIR ... --out DIR``.

For every JPEG 2000 / HTJ2K file: the frame decoded on the GPU (:class:`lungseg.gpu_decode.GpuFrameDecoder`, as
the service's ``gpu_decode`` does) against pydicom's CPU decoders (OpenJPEG / OpenJPH through pylibjpeg), at full
resolution. Lossless transfer syntaxes must match bit for bit; lossy ones report the largest difference. Times are
the median of ``--repeat`` decodes each (the first, warm-up decode untimed). Other files are listed as skipped.
Writes ``gpu_decode_check.json`` into ``--out``; the evidence ``gpu_decode`` needs before it may be turned on.

Exit codes: 0 every lossless file pixel-exact and no GPU error; 1 a check failed; 2 usage error;
3 nvImageCodec or its GPU is not available here (nothing checked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from lungseg.gpu_decode import GpuDecodeError, GpuFrameDecoder
from lungseg.pixel_render import J2K_SYNTAXES

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DECODER = 0, 1, 2, 3
LOSSLESS = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202"})


def _median_ms(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return result, statistics.median(times)


def check_file(path: Path, gpu: GpuFrameDecoder, repeat: int) -> dict[str, Any]:
    """One file's row (see the module docstring)."""
    ds = pydicom.dcmread(path)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    row: dict[str, Any] = {"file": path.name, "transfer_syntax": syntax, "rows": int(ds.get("Rows", 0) or 0),
                           "columns": int(ds.get("Columns", 0) or 0)}
    if syntax not in J2K_SYNTAXES:
        return {**row, "skipped": "not JPEG 2000"}

    def on_cpu() -> np.ndarray:
        return pydicom.dcmread(path).pixel_array

    def on_gpu() -> np.ndarray:
        return gpu.stored_values(ds)

    cpu, cpu_ms = _median_ms(on_cpu, repeat)
    try:
        out, gpu_ms = _median_ms(on_gpu, repeat)
    except GpuDecodeError as exc:
        return {**row, "passed": False, "error": str(exc), "cpu_ms": round(cpu_ms, 2)}
    same_shape = out.shape == cpu.shape
    diff = int(np.max(np.abs(out.astype(np.int64) - cpu.astype(np.int64)))) if same_shape else None
    lossless = syntax in LOSSLESS
    return {**row, "lossless": lossless, "pixel_exact": bool(same_shape and diff == 0), "max_abs_diff": diff,
            "dtype_gpu": str(out.dtype), "dtype_cpu": str(cpu.dtype),
            "cpu_ms": round(cpu_ms, 2), "gpu_ms": round(gpu_ms, 2), "speedup": round(cpu_ms / gpu_ms, 2),
            "passed": bool(same_shape and (diff == 0 or not lossless))}


def files_in(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        found += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lungseg.benchmarks.gpu_decode_check",
        description="nvImageCodec (GPU) vs the CPU decoders on JPEG 2000 / HTJ2K DICOM files: pixel-exactness and "
        "time; writes gpu_decode_check.json.",
        epilog=f"exit codes: {EXIT_OK} passed; {EXIT_FAILED} a check failed; {EXIT_USAGE} usage error; "
        f"{EXIT_NO_DECODER} nvImageCodec or its GPU not available (nothing checked)")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="FILE_OR_DIR")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for gpu_decode_check.json")
    parser.add_argument("--repeat", type=int, default=5, help="timed decodes per file and decoder (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    files = files_in(args.inputs)
    if not files or args.repeat < 1:
        print("gpu_decode_check: no input files" if not files else "gpu_decode_check: --repeat must be >= 1",
              file=sys.stderr)
        return EXIT_USAGE
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_decode_check.json"
    gpu, reason = GpuFrameDecoder.create(max_pixels=50_000_000, max_frame_bytes=512 << 20)
    if gpu is None:
        path.write_text(json.dumps({"passed": False, "no_decoder": True, "reason": reason}, indent=2) + "\n")
        print(f"gpu_decode_check: {reason} (exit {EXIT_NO_DECODER})", file=sys.stderr)
        return EXIT_NO_DECODER
    rows = [check_file(f, gpu, args.repeat) for f in files]
    checked = [r for r in rows if "skipped" not in r]
    passed = bool(checked) and all(r["passed"] for r in checked)
    path.write_text(json.dumps({"decoder": gpu.label, "passed": passed, "repeat": args.repeat, "files": rows},
                               indent=2) + "\n")
    for r in rows:
        if "skipped" in r:
            print(f"SKIP {r['file']}: {r['skipped']}", file=sys.stderr)
        else:
            print(f"{'PASS' if r['passed'] else 'FAIL'} {r['file']}: "
                  + (r.get("error") or f"exact={r['pixel_exact']} cpu {r['cpu_ms']} ms, gpu {r['gpu_ms']} ms"),
                  file=sys.stderr)
    print(f"gpu_decode_check: {'passed' if passed else 'FAILED'}; wrote {path}", file=sys.stderr)
    return EXIT_OK if passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
