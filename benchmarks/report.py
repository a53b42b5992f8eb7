"""Render a benchmark result: text tables (stdout), Markdown, and a latency plot (PNG)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.metrics import METRIC_NAMES

from .acceptance import BOUNDS, PARITY, PERFORMANCE, describe, row, verdict
from .cpu_backends import text_lines as cpu_backend_lines
from .dicom_path import STAGES


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, float | int) else str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], markdown: bool) -> list[str]:
    rows = [[str(c) for c in row] for row in rows]
    if markdown:
        return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                *("| " + " | ".join(row) + " |" for row in rows)]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return [line.format(*r).rstrip() for r in (header, ["-" * w for w in widths], *rows)]


def _features(result: dict[str, Any]) -> str:
    """The CPU's SIMD flags, printed beside every parity and timing figure (int8 kernels depend on them)."""
    flags = result["machine"].get("cpu_features")
    return " ".join(flags) if flags else "unknown"


def _dicom_sections(result: dict[str, Any], markdown: bool) -> list[tuple[str, list[str]]]:
    dicom = result.get("dicom_path")
    if not dicom:
        return []
    cpu = f"[CPU: {_features(result)}]"
    sections = []
    stages = dicom["stages"]
    if "skipped" in stages:
        sections.append((f"DICOM path, stage by stage {cpu}", [f"skipped: {stages['skipped']}"]))
    else:
        rows = []
        for label in ("default", "sc_off", "legacy"):
            if label not in stages:  # a result from before the sc_off path
                continue
            for name, row in stages[label]["per_file"].items():
                st, parts = row["stages_ms"], row["write_parts_ms"]
                detail = ", ".join(f"{k} {v:.0f}" for k, v in parts.items() if v >= 0.5)
                rows.append([name, label, *(f"{st.get(k, 0.0):.0f}" for k in STAGES), f"{row['non_inference_ms']:.0f}",
                             _fmt(row["ratio_non_inference_to_infer"]), _fmt(row.get("ratio_with_gate")), detail])
        backend = ", ".join(stages["default"].get("backend") or []) or "-"
        sections.append((f"DICOM path, stage by stage (lungseg-edge --once --batch-size 1, {backend}; median of "
                         f"{stages['copies']} copies, ms) {cpu}",
                         [*_table(["file", "path", *STAGES, "non-inference", "non-inf / infer", "with gate",
                                   "write parts"], rows, markdown),
                          "", f"legacy = the 0.1.0 path: `{stages['legacy_args']}` on the fp32 model alone",
                          *([f"sc_off = the defaults with `{stages['sc_off_args']}` (SEG + SR only)"]
                            if "sc_off" in stages else []),
                          "", "non-inference = decode + preprocess + postprocess + qa + write; the image gate "
                          "(a second model) is added in 'with gate'"]))
    burst = dicom["burst"]
    if "skipped" in burst:
        sections.append((f"Burst {cpu}", [f"skipped: {burst['skipped']}"]))
    else:
        rows = []
        for label in ("default", "legacy"):
            b = burst[label]
            rows.append([label, ", ".join(b.get("backend") or []) or "-", f"{b['written']}/{b['files']}",
                         f"{b['wall_s']:.1f}", _fmt(b["files_per_s"]),
                         _fmt(b["arrival_to_sc"].get("p50_ms"), ".0f"), _fmt(b["peak_rss_mib"], ".0f"),
                         _fmt(b.get("worker_peak_rss_mib"), ".0f"), b["exit_code"]])
        sections.append((f"Burst of {burst['files']} small (512 px) uncompressed files, one --once run each {cpu}",
                         [*_table(["path", "backend", "written", "wall s", "files/s", "arrival->SC p50 ms",
                                   "daemon peak RSS MiB", "decode worker peak RSS MiB", "exit"], rows, markdown),
                          "", f"throughput default / legacy: {_fmt(burst.get('speedup'))}x"]))
    parity = dicom["mask_parity"]
    rows = [[name, "x".join(map(str, v["native"])), "x".join(map(str, v["decoded"])), v["level"], f"{v['dice']:.5f}"]
            for name, v in parity["per_file"].items()]
    sections.append((f"Native-size mask, default path vs 0.1.0 full-resolution path (decode min side "
                     f"{parity['min_side']}) {cpu}",
                     [*_table(["file", "native", "decoded", "level", "mask Dice"], rows, markdown), "",
                      f"mean Dice {_fmt(parity['dice_mean'], '.5f')}, min {_fmt(parity['dice_min'], '.5f')} "
                      f"({'pass' if parity['passed'] else 'FAIL'}, gate mean >= {parity.get('gate', 0.995)})"]))
    return sections


def _status(entry: dict[str, Any]) -> str:
    return {True: "pass", False: "FAIL", None: "not measured"}[entry["passed"]]


def _acceptance_section(result: dict[str, Any], markdown: bool) -> tuple[str, list[str]]:
    rows = [[name, entry["kind"], entry.get("file") or "-", _fmt(entry["value"], ".3f"),
             f"{entry['op']} {entry['bound']:g}", _fmt(entry.get("legacy"), ".3f"),
             _status(entry) + (f" ({why})" if (why := entry.get("skipped") or entry.get("error")) else "")]
            for name, entry in result["acceptance"].items()]
    return (f"Acceptance (every figure from this run, with its bound) [CPU: {_features(result)}]",
            _table(["row", "kind", "file", "value", "bound", "0.1.0 path", "result"], rows, markdown))


def _result_lines(result: dict[str, Any]) -> list[str]:
    """The verdict: PASSED only when no parity gate and no measured acceptance row failed."""
    v, rows = result["verdict"], result["acceptance"]
    reference = result["reference"]
    lines = [f"reference: {reference['description']}", f"golden set: {reference['golden_set']}",
             "parity: " + ("FAILED: " + ", ".join(v["parity_failed"]) if v["parity_failed"] else "passed")]
    performance = [entry for entry in rows.values() if entry["kind"] != PARITY]
    measured = sum(entry["passed"] is not None for entry in performance)
    failed_rows = ", ".join(describe(name, rows[name]) for name in v["acceptance_failed"])
    if failed_rows:
        lines.append(f"acceptance: FAILED: {failed_rows}")
    elif measured:
        lines.append(f"acceptance: passed ({measured} of {len(performance)} performance rows measured)")
    else:
        lines.append(f"acceptance: not measured (none of the {len(performance)} performance rows)")
    if v["not_measured"]:
        lines.append("not measured: " + "; ".join(f"{name} ({why})" for name, why in v["not_measured"].items()))
    failed = [*(["parity"] if v["parity_failed"] else []), *(["acceptance"] if v["acceptance_failed"] else [])]
    unmeasured = f" ({len(v['not_measured'])} rows not measured)" if v["not_measured"] else ""
    lines.append(f"verdict: FAILED ({' and '.join(failed)})" if failed else f"verdict: PASSED{unmeasured}")
    return lines


#: performance rows of earlier lungseg-bench versions that this one no longer measures, and their comparisons
#: (0.1.x measured non-inference / inference ratios against the model it ran; 0.2.0 measures against a yardstick)
EARLIER_OPS = {"j2k_ratio": "<=", "uncompressed_ratio": "<=", "burst_speedup": ">=", "daemon_peak_rss_mib": "<"}


def upgraded(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` in this version's layout. A result written by an earlier lungseg-bench (its DICOM rows
    under ``dicom_path``, no golden set, no verdict) gets its rows' kinds and bounds and a computed verdict."""
    if "verdict" in result:
        return result
    out = dict(result)
    bounds = {**EARLIER_OPS, **{name: b.op for name, b in BOUNDS.items()}}
    rows = {name: {"kind": PERFORMANCE if name in bounds else PARITY, "op": bounds.get(name, ">="), **entry}
            for name, entry in (result.get("dicom_path") or {}).get("acceptance", {}).items()}
    old = result.get("acceptance") or {}
    ort_p50, torch_p50 = old.get("ort_cpu_p50_ms"), old.get("pytorch_p50_ms")
    both = bool(ort_p50 and torch_p50)
    rows["ort_cpu_vs_pytorch_p50"] = row(BOUNDS["ort_cpu_vs_pytorch_p50"], ort_p50 / torch_p50 if both else None,
                                         skipped=None if both else "no PyTorch timing",
                                         ort_cpu_p50_ms=ort_p50, pytorch_p50_ms=torch_p50)
    out["acceptance"] = rows
    reference = result["parity"]["reference"]
    out["reference"] = {"backend": reference, "description": reference,
                        "golden_set": "not checked (a result of an earlier lungseg-bench)"}
    out["verdict"] = verdict(out)
    return out


def _parity_cells(r: dict[str, Any]) -> list[str]:
    return [r["precision"], f"{r['dice_mean']:.5f}", f"{r['dice_min']:.5f}", f"{100 * r['flip_fraction']:.4f}",
            f"{r['abs_diff_max']:.2e}", f"{r['abs_diff_median']:.2e}", f"{r['abs_diff_p99']:.2e}",
            f"{r['required_dice']} {'pass' if r['passed'] else 'FAIL'}"]


def _sections(result: dict[str, Any], markdown: bool) -> list[tuple[str, list[str]]]:
    result = upgraded(result)
    sections = []
    m = result["machine"]
    gpu = m["gpu"]
    sections.append(("Machine", [
        f"CPU: {m['cpu']} ({m['usable_cores']} usable cores, {m['threads']} threads used), "
        f"load average {_fmt(m['load_average'][0] if m.get('load_average') else None)}",
        f"CPU features: {_features(result)}",
        "GPU: " + (f"{gpu['name']} (sm {gpu['compute_capability']})" if gpu["present"] else f"none: {gpu['reason']}"),
        "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"model: {result['model']['name']} {result['model']['version']} ({result['model']['bundle']}); "
        f"data: {result['data']['source']} ({result['data']['n_images']} images)",
    ]))
    sections.append(("Backends", _table(
        ["backend", "status"],
        [[name, f"{b['precision']} on {b['device']} ({b['model']})" if b["available"] else f"skipped: {b['reason']}"]
         for name, b in result["backends"].items()], markdown)))
    if result.get("cpu_backends", {}).get("rows"):
        sections.append(("CPU backends side by side", cpu_backend_lines(result["cpu_backends"])[1:]))
    parity = result["parity"]
    rows = []
    for name, r in parity["results"].items():
        if r.get("is_reference"):
            rows.append([name, "reference", "-", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append([name, *_parity_cells(r)])
    header = ["backend", "precision", "Dice mean", "Dice min", "flip %", "abs Δp max", "abs Δp p50", "abs Δp p99",
              "gate (mean Dice)"]
    sections.append((f"Parity vs {parity['reference']} ({parity['n_images']} images, threshold {parity['threshold']}) "
                     f"[CPU: {_features(result)}]",
                     [f"reference: {result['reference']['description']}",
                      *([f"FAILED: {parity['error']}"] if parity.get("error") else []), "",
                      *_table(header, rows, markdown)]))
    golden = parity.get("golden")
    if golden is not None:
        if "results" in golden:
            rows = [[name, *_parity_cells(r)] for name, r in golden["results"].items()]
            title = (f"Parity vs the bundle's golden set ({golden['source']}: {golden['reference']}, "
                     f"{golden['n_images']} images) [CPU: {_features(result)}]")
            sections.append((title, _table(header, rows, markdown)))
        else:
            sections.append(("Parity vs the bundle's golden set",
                             [f"{'FAILED' if golden.get('error') else 'skipped'}: "
                              f"{golden.get('error') or golden.get('skipped')}"]))
    if parity["with_truth"]:
        rows = []
        for name, r in parity["results"].items():
            if "metrics" in r:
                rows.append([name, *(f"{r['metrics'].get(k, float('nan')):.4f} "
                                     f"({r['metrics_delta_vs_reference'].get(k, 0.0):+.4f})" for k in METRIC_NAMES)])
        sections.append(("Ground-truth metrics (mean; Δ vs reference)", _table(["backend", *METRIC_NAMES], rows,
                                                                                 markdown)))
    latency = result["latency"]
    sections += _dicom_sections(result, markdown)
    rows = []
    for name, sizes in latency["batches"].items():
        for size, s in sizes.items():
            rows.append([name, size, _fmt(s["p50_ms"]), _fmt(s["p95_ms"]), _fmt(s["per_image_ms"]),
                         _fmt(s["images_per_s"], ".1f")])
    sections.append((f"Inference latency by batch size (ms per call) [CPU: {_features(result)}]",
                     _table(["backend", "batch", "p50", "p95", "p50 per image", "images/s"], rows, markdown)))
    compute = result["compute"]
    lines = [f"peak memory: {_fmt(latency['memory'].get('max_rss_mib'), '.0f')} MiB RSS"
             + (f", CUDA {latency['memory']['torch_cuda_max_allocated_mib']:.0f} MiB"
                if "torch_cuda_max_allocated_mib" in latency["memory"] else "")]
    if "skipped" in compute:
        lines.append(f"FLOPs: skipped ({compute['skipped']})")
    else:
        gemm = compute["gemm_gflops"]
        lines.append(f"U-Net: {compute['gflops']:.2f} GFLOP per 256x256 image (init_features "
                     f"{compute['init_features']}, {compute['parameters']:,} parameters); float32 GEMM "
                     f"{_fmt(gemm['numpy'], '.0f')} GFLOP/s numpy, {_fmt(gemm.get('torch'), '.0f')} GFLOP/s torch; "
                     f"floor {compute['floor_ms_per_image']:.1f} ms per image")
    sections.append(("Compute", lines))
    sections.append(_acceptance_section(result, markdown))
    sections.append(("Result", _result_lines(result)))
    return sections


def text_report(result: dict[str, Any]) -> str:
    """The report as plain text tables (for stdout)."""
    out = []
    for title, lines in _sections(result, markdown=False):
        out += [f"== {title}", *lines, ""]
    return "\n".join(out)


def markdown_report(result: dict[str, Any]) -> str:
    """The report as Markdown."""
    out = ["# lungseg benchmark", "", f"Created {result['created']}.", ""]
    for title, lines in _sections(result, markdown=True):
        out += [f"## {title}", "", *(line if line.startswith("|") else line + "  " for line in lines), ""]
    return "\n".join(out)


def latency_plot(result: dict[str, Any], path: Path) -> Path:
    """Two panels: DICOM stages per file (default vs 0.1.0 path) and inference time by backend and batch size."""
    import matplotlib  # the [train] extra; only the plot needs it (the CLI checks for it up front)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency = result["latency"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    stages = (result.get("dicom_path") or {}).get("stages") or {}
    if "default" in stages:
        rows = [(f"{name.removesuffix('.dcm')[:22]}\n{label}", row["stages_ms"])
                for name in stages["default"]["per_file"] for label in ("default", "legacy")
                if (row := stages[label]["per_file"].get(name))]
        y = np.arange(len(rows))
        left_edge = np.zeros(len(rows))
        for stage in STAGES:
            values = np.array([r[1].get(stage, 0.0) for r in rows])
            left.barh(y, values, left=left_edge, label=stage)
            left_edge += values
        left.set_yticks(y, [r[0] for r in rows], fontsize=6)
        left.invert_yaxis()
        left.set_xlabel("ms per file (median)")
        left.legend(fontsize=7)
    left.set_title("DICOM path per stage: default vs 0.1.0 path")
    backends = list(latency["batches"])
    sizes = sorted({int(s) for b in backends for s in latency["batches"][b]})
    width = 0.8 / max(len(sizes), 1)
    x = np.arange(len(backends))
    for i, size in enumerate(sizes):
        values = [latency["batches"][b].get(str(size), {}).get("per_image_ms", 0.0) for b in backends]
        right.bar(x + (i - (len(sizes) - 1) / 2) * width, values, width, label=f"batch {size}")
    floor = result["compute"].get("floor_ms_per_image")
    if floor:
        right.axhline(floor, color="grey", linestyle="--", label="fp32 GEMM floor")
    right.set_xticks(x, backends, rotation=20, ha="right")
    right.set_ylabel("p50 ms per image")
    right.set_title("inference by backend")
    right.legend()
    fig.suptitle(f"{result['model']['name']} {result['model']['version']} on {result['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
