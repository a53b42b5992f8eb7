"""Every CPU backend side by side: latency at batch 1 and 4 (interleaved rounds), mask Dice vs the fp32 ONNX,
speed-up vs onnxruntime fp32, the ISA where the runtime says, and which one the runtime's start-up choice takes.

All configurations run in the same rounds, one after another, so a machine busy with other work slows them
alike; each configuration's figure is the median over rounds of ms per image, with the spread (min-max).
Where OpenVINO is installed, the same run measures this CPU's int8 floor for the model
(:mod:`.int8_ceiling`) and each row says how close it comes (floor ms / its ms at batch 1), and the
table says the most any int8 backend could be over onnxruntime int8 here.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lungseg.bundle import Bundle
from lungseg.openvino_runtime import openvino_installed
from lungseg.predictors import (
    BackendOptions,
    BackendUnavailableError,
    OnnxRuntimePredictor,
    Predictor,
    select_predictor,
)
from lungseg.selftest import compare_masks

from .acceptance import BOUNDS, CPU_FAMILY_SPEEDUP, Bound
from .acceptance import row as acceptance_row
from .backends import CPU_FP32, Backend
from .int8_ceiling import against_floor, int8_floor

log = logging.getLogger(__name__)

# backends.discover names -> lungseg.predictors CPU candidate names
CANDIDATE = {"onnxruntime-cpu": "cpu-fp32", "onnxruntime-int8": "cpu-int8", "openvino-int8": "openvino-int8",
             "openvino-bf16": "openvino-bf16", "openvino-fp32": "openvino-fp32", "openvino-gpu": "openvino-gpu",
             "openvino-npu": "openvino-npu"}
ORT_INT8 = "onnxruntime-int8"
BATCH_SIZES = (1, 4)
QUALITY = (0.995, 0.98)  # mean and min mask Dice vs the fp32 ONNX a configuration must keep to count as fastest


def _cpu(backends: Sequence[Backend]) -> dict[str, Predictor]:
    return {b.name: b.predictor for b in backends
            if b.available and b.name in CANDIDATE and b.predictor is not None
            and b.predictor.backend in ("cpu", "openvino")}


def interleaved_ms(predictors: dict[str, Predictor], batch: np.ndarray, *, rounds: int,
                   batch_sizes: Sequence[int] = BATCH_SIZES) -> dict[str, dict[str, dict[str, float]]]:
    """ms per image for each predictor and batch size: median and min-max over ``rounds`` interleaved rounds."""
    samples: dict[str, dict[int, list[float]]] = {n: {s: [] for s in batch_sizes} for n in predictors}
    inputs = {s: np.ascontiguousarray(batch[np.arange(s) % len(batch)]) for s in batch_sizes}
    for predictor in predictors.values():  # untimed warm-up
        for size in batch_sizes:
            predictor.predict(inputs[size])
    for _ in range(rounds):
        for size in batch_sizes:
            for name, predictor in predictors.items():
                start = time.perf_counter()
                predictor.predict(inputs[size])
                samples[name][size].append((time.perf_counter() - start) * 1000 / size)
    return {name: {str(s): {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": len(v)}
                   for s, v in per.items()} for name, per in samples.items()}


def default_choice(bundle: Bundle, threads: int) -> dict[str, Any]:
    """What the runtime's start-up (``cpu`` backend, ``cpu_choice="fastest"``) serves on this machine, and why."""
    try:
        predictor = select_predictor(bundle, "cpu", options=BackendOptions(threads=threads)).predictor
    except BackendUnavailableError as exc:
        return {"error": str(exc)}
    return {"candidate": predictor.current_name, **predictor.status()["choice"]}


def compare_cpu(bundle: Bundle, backends: Sequence[Backend], batch: np.ndarray, *, threads: int,
                rounds: int = 10) -> dict[str, Any]:
    """The side-by-side table (see the module docstring); ``batch`` (N, 3, S, S) should be held-out images."""
    predictors = _cpu(backends)
    reference = predictors.get(CPU_FP32) or OnnxRuntimePredictor(str(bundle.onnx), device="cpu", threads=threads)
    ref = np.concatenate([reference.predict(batch[i:i + 4]) for i in range(0, len(batch), 4)])
    rows: dict[str, dict[str, Any]] = {}
    for name, predictor in predictors.items():
        out = np.concatenate([predictor.predict(batch[i:i + 4]) for i in range(0, len(batch), 4)])
        stats = compare_masks(ref, out, "int8")
        rows[name] = {"candidate": CANDIDATE[name], "precision": predictor.precision,
                      "model": str(getattr(predictor, "model_path", "")).rsplit("/", 1)[-1],
                      "isa": getattr(predictor, "isa", None) or "not reported by onnxruntime",
                      "inference_precision": getattr(predictor, "inference_precision", predictor.precision),
                      "dice_mean": stats["dice_mean"], "dice_min": stats["dice_min"],
                      "keeps_quality": bool(stats["dice_mean"] >= QUALITY[0] and stats["dice_min"] >= QUALITY[1])}
    floor = int8_floor(bundle.onnx, threads)
    timing = interleaved_ms(predictors, batch, rounds=rounds)
    base = timing.get(CPU_FP32)
    for name, row in rows.items():
        row["ms_per_image"] = timing[name]
        if base:
            row["speedup_vs_ort_fp32"] = {s: base[s]["median"] / timing[name][s]["median"] for s in timing[name]}
        if "skipped" not in floor:
            row["vs_int8_floor"] = {s: against_floor(floor, t["median"]) for s, t in timing[name].items()}
    if "skipped" not in floor and ORT_INT8 in timing:
        floor["most_over_ort_int8_b1"] = timing[ORT_INT8]["1"]["median"] / floor["floor_ms_per_image"]
    result: dict[str, Any] = {"reference": f"{CPU_FP32} ({bundle.onnx.name})", "n_images": len(batch),
                              "rounds": rounds, "threads": threads, "quality_bar": list(QUALITY), "rows": rows,
                              "openvino_installed": openvino_installed(), "int8_floor": floor}
    good = {n: r for n, r in rows.items() if r["keeps_quality"]}
    if good:
        fastest = min(good, key=lambda n: good[n]["ms_per_image"]["1"]["median"])
        result["fastest_at_quality"] = fastest
        choice = default_choice(bundle, threads)
        result["default_choice"] = choice
        chosen = next((n for n, r in rows.items() if r["candidate"] == choice.get("candidate")), None)
        if chosen is not None:
            result["default_vs_fastest_b1"] = (rows[chosen]["ms_per_image"]["1"]["median"]
                                               / good[fastest]["ms_per_image"]["1"]["median"])
    return result


def acceptance_rows(result: dict[str, Any], bounds: dict[str, Bound], features: Sequence[str]
                    ) -> dict[str, dict[str, Any]]:
    """The issue's two CPU rows from the side-by-side table: the start-up's choice against the fastest that keeps
    quality, and against onnxruntime int8 with this CPU family's bound (see acceptance.CPU_FAMILY_SPEEDUP)."""
    rows = result.get("rows", {})
    choice = result.get("default_choice", {})
    chosen = next((n for n, r in rows.items() if r["candidate"] == choice.get("candidate")), None)
    b1 = {n: r["ms_per_image"]["1"]["median"] for n, r in rows.items()}
    missing = (f"the start-up chose nothing ({choice['error']})" if "error" in choice
               else "no CPU configuration kept the quality bar" if "fastest_at_quality" not in result
               else f"the start-up's choice {choice.get('candidate')} is not in the table")
    out = {"cpu_default_vs_fastest_b1": acceptance_row(
        bounds["cpu_default_vs_fastest_b1"], result.get("default_vs_fastest_b1"), missing=missing,
        chosen=chosen, fastest=result.get("fastest_at_quality"))}
    name = "cpu_default_over_ort_int8_b1"
    bound = bounds[name]
    family = next((flag for flag, _ in CPU_FAMILY_SPEEDUP if flag in features), "other")
    if bound is BOUNDS[name]:  # not moved by --bound: this CPU family's
        bound = Bound(bound.op, dict(CPU_FAMILY_SPEEDUP).get(family, bound.limit), bound.what)
    skipped = ("openvino is not installed (the [openvino] extra): the CPU choice is onnxruntime's own"
               if not result.get("openvino_installed") else
               "the bundle has no onnxruntime int8 model" if ORT_INT8 not in b1 else None)
    value = b1[ORT_INT8] / b1[chosen] if chosen and ORT_INT8 in b1 else None
    out[name] = acceptance_row(bound, value, skipped=skipped, missing=missing, chosen=chosen, cpu_family=family,
                    ort_int8_ms=b1.get(ORT_INT8), chosen_ms=b1.get(chosen) if chosen else None)
    return out


def text_lines(result: dict[str, Any]) -> list[str]:
    """The table as text lines (``lungseg-bench``'s report)."""
    lines = [f"CPU backends side by side ({result['n_images']} images, {result['rounds']} interleaved rounds, "
             f"{result['threads']} threads; Dice vs {result['reference']}):",
             f"  {'backend':18} {'b1 ms/img (min-max)':24} {'b4 ms/img (min-max)':24} {'x ORT fp32 b1/b4':16} "
             f"{'Dice mean/min':15} {'GMAC/s b1 (of floor)':21} isa"]
    for name, row in result["rows"].items():
        t = row["ms_per_image"]
        speed = row.get("speedup_vs_ort_fp32", {})
        near = row.get("vs_int8_floor", {}).get("1")
        rate = f"{near['gmac_per_s']:5.0f} ({near['of_int8_floor']:4.0%})" if near else "-"
        lines.append(f"  {name:18} {t['1']['median']:6.1f} ({t['1']['min']:.1f}-{t['1']['max']:.1f}){'':7} "
                     f"{t['4']['median']:6.1f} ({t['4']['min']:.1f}-{t['4']['max']:.1f}){'':7} "
                     f"{speed.get('1', 0):.2f}/{speed.get('4', 0):.2f}{'':7} "
                     f"{row['dice_mean']:.4f}/{row['dice_min']:.4f}  {rate:21} {row['isa']}")
    if "default_choice" in result:
        lines.append(f"  default choice: {result['default_choice'].get('candidate')} "
                     f"({result['default_choice'].get('reason')}); fastest keeping Dice >= "
                     f"{QUALITY[0]}/{QUALITY[1]}: {result.get('fastest_at_quality')}; default/fastest at b1 "
                     f"{result.get('default_vs_fastest_b1', float('nan')):.2f}")
    lines.extend(floor_lines(result.get("int8_floor", {})))
    return lines


def floor_lines(floor: dict[str, Any]) -> list[str]:
    """What the int8 floor is and what it allows (one or two lines)."""
    if not floor:
        return []
    if "skipped" in floor:
        return [f"  int8 floor: not measured ({floor['skipped']})"]
    lines = [f"  int8 floor: {floor['floor_ms_per_image']:.1f} ms/image = {floor['model_gmac']:.2f} GMAC per image at "
             f"{floor['ceiling_gmac_per_s']:.0f} GMAC/s, the best int8 convolution rate measured here "
             f"({floor['kernel']}, {floor['runtime']}, {len(floor['shapes'])} conv shapes of the model, "
             f"{floor['threads']} threads); 'of floor' = floor ms / a backend's ms"]
    if "most_over_ort_int8_b1" in floor:
        lines.append(f"  the most any int8 CPU backend could be over onnxruntime-int8 on this machine (b1): "
                     f"{floor['most_over_ort_int8_b1']:.2f}x")
    return lines


__all__ = ["BATCH_SIZES", "CANDIDATE", "QUALITY", "acceptance_rows", "compare_cpu", "default_choice", "floor_lines",
           "interleaved_ms", "text_lines"]
