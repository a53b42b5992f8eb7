"""The acceptance rows of ``lungseg-bench`` and the verdict of one run.

A row is one figure measured in the run, its bound and whether it holds: ``passed`` is
``True``, ``False`` or ``None`` (not measured, ``skipped`` saying why: ``--skip-e2e``, no
PyTorch, ...). A row that was supposed to be measured but produced no value fails.
Performance rows (:data:`BOUNDS`) can be moved for one run with ``--bound ROW=VALUE``
(a loaded CI machine, say); parity rows have their own gates (``--min-dice-*``).

The verdict fails when any parity gate fails or any measured row fails; rows that were
not measured are listed beside it, never counted as passes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PARITY = "parity"
PERFORMANCE = "performance"
_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}


@dataclass(frozen=True)
class Bound:
    """``value op limit`` must hold, e.g. ``ratio <= 1.0``."""

    op: str
    limit: float
    what: str = ""

    def holds(self, value: float) -> bool:
        return bool(math.isfinite(value) and _OPS[self.op](value, self.limit))

    def text(self) -> str:
        return f"{self.op} {self.limit:g}"


# the performance rows and their default bounds
BOUNDS: dict[str, Bound] = {
    # the yardstick: fp32 onnxruntime CPU inference of one image, timed in the same run (so a faster
    # backend does not move the goal); the SC is written at full resolution from a full-resolution decode
    "j2k_after_decode": Bound("<=", 1.0, "2128x2000 JPEG 2000 file: every non-inference stage but its full "
                                         "decode (render, encode, SEG, SR, verify, fsync, publish) / yardstick"),
    "j2k_decode_vs_library": Bound("<=", 1.15, "its decode stage / pydicom's own decode of that file in this "
                                               "process (pixel_array through the same plugin)"),
    "uncompressed_vs_yardstick": Bound("<=", 1.5, "1955x1841 uncompressed file: the whole non-inference path / "
                                                  "yardstick"),
    "sc_off_vs_yardstick": Bound("<=", 1.0, "the same JPEG 2000 file with sc = false (SEG + SR only): the whole "
                                            "non-inference path, its reduced decode included / yardstick"),
    "burst_speedup": Bound(">=", 1.5, "burst throughput, defaults / 0.1.0 path"),
    "daemon_peak_rss_mib": Bound("<", 700.0, "lungseg-edge's peak RSS in the burst, MiB"),
    "ort_cpu_vs_pytorch_p50": Bound("<=", 1.0, "onnxruntime CPU fp32 p50 / PyTorch eager p50, batch 1"),
    # the CPU backends' side-by-side table (interleaved rounds, batch 1, medians)
    "cpu_default_vs_fastest_b1": Bound("<=", 1.15, "the start-up's CPU choice / the fastest CPU configuration that "
                                                   "keeps mask Dice >= 0.995 mean, 0.98 min"),
    "cpu_default_over_ort_int8_b1": Bound(">=", 1.0, "onnxruntime int8 (the shipped CPU model before OpenVINO) / "
                                                     "the start-up's CPU choice; the default bound is this CPU "
                                                     "family's: 4 with AMX, 1.5 with AVX-512 VNNI, 1 elsewhere"),
}
# cpu_default_over_ort_int8_b1 by CPU family (the first flag this CPU has), unless --bound sets one
CPU_FAMILY_SPEEDUP = (("amx_int8", 4.0), ("avx512_vnni", 1.5))


def parse_bounds(items: Iterable[str]) -> dict[str, Bound]:
    """:data:`BOUNDS` with ``ROW=VALUE`` overrides; ``ValueError`` names a bad item."""
    bounds = dict(BOUNDS)
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in BOUNDS:
            raise ValueError(f"--bound {item!r}: expected ROW=VALUE with ROW one of {', '.join(BOUNDS)}")
        try:
            limit = float(value)
        except ValueError:
            raise ValueError(f"--bound {item!r}: {value!r} is not a number") from None
        if math.isnan(limit):
            raise ValueError(f"--bound {item!r}: not a number")
        bounds[name] = Bound(BOUNDS[name].op, limit, BOUNDS[name].what)
    return bounds


def row(bound: Bound, value: float | None, *, kind: str = PERFORMANCE, skipped: str | None = None,
        missing: str = "no value was measured", **extra: Any) -> dict[str, Any]:
    """One acceptance row: ``value`` against ``bound``; ``skipped`` (not measured) wins over the value."""
    out: dict[str, Any] = {"kind": kind, "value": value, "op": bound.op, "bound": bound.limit, **extra}
    if skipped is not None:
        out.update(passed=None, skipped=skipped)
    elif value is None:
        out.update(passed=False, error=missing)
    else:
        out["passed"] = bound.holds(float(value))
    return out


def describe(name: str, entry: Mapping[str, Any]) -> str:
    """``name value (bound op limit)`` for a row, as the report and the CLI print it."""
    value = entry.get("value")
    shown = "no value" if value is None else f"{value:.3f}"
    return f"{name} {shown} (bound {entry['op']} {entry['bound']:g})"


def verdict(result: Mapping[str, Any]) -> dict[str, Any]:
    """Which parity gates and acceptance rows failed, and which rows were not measured."""
    parity = result["parity"]
    parity_failed = [f"{name} vs {parity['reference']}" for name, entry in parity["results"].items()
                     if entry.get("passed") is False]
    if parity.get("error"):
        parity_failed.append(parity["error"])
    golden = parity.get("golden") or {}
    if golden.get("error"):
        parity_failed.append(f"golden set: {golden['error']}")
    parity_failed += [f"{name} vs the golden set" for name, entry in (golden.get("results") or {}).items()
                      if entry.get("passed") is False]
    rows = result["acceptance"]
    parity_failed += [name for name, entry in rows.items() if entry["kind"] == PARITY and entry["passed"] is False]
    failed = [name for name, entry in rows.items() if entry["kind"] != PARITY and entry["passed"] is False]
    return {"passed": not parity_failed and not failed, "parity_failed": parity_failed, "acceptance_failed": failed,
            "not_measured": {name: entry.get("skipped") for name, entry in rows.items() if entry["passed"] is None}}
