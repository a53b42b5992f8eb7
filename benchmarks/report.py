"""Render a benchmark result: text tables (stdout), Markdown, and a latency plot (PNG)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lungseg.metrics import METRIC_NAMES

from .latency import STAGES


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


def _sections(result: dict[str, Any], markdown: bool) -> list[tuple[str, list[str]]]:
    sections = []
    m = result["machine"]
    gpu = m["gpu"]
    sections.append(("Machine", [
        f"CPU: {m['cpu']} ({m['usable_cores']} usable cores, {m['threads']} threads used), "
        f"load average {_fmt(m['load_average'][0] if m.get('load_average') else None)}",
        "GPU: " + (f"{gpu['name']} (sm {gpu['compute_capability']})" if gpu["present"] else f"none: {gpu['reason']}"),
        "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"model: {result['model']['name']} {result['model']['version']} ({result['model']['bundle']}); "
        f"data: {result['data']['source']} ({result['data']['n_images']} images)",
    ]))
    sections.append(("Backends", _table(
        ["backend", "status"],
        [[name, f"{b['precision']} on {b['device']} ({b['model']})" if b["available"] else f"skipped: {b['reason']}"]
         for name, b in result["backends"].items()], markdown)))
    parity = result["parity"]
    rows = []
    for name, r in parity["results"].items():
        if r.get("is_reference"):
            rows.append([name, "reference", "-", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append([name, r["precision"], f"{r['dice_mean']:.5f}", f"{r['dice_min']:.5f}",
                     f"{100 * r['flip_fraction']:.4f}", f"{r['abs_diff_max']:.2e}", f"{r['abs_diff_median']:.2e}",
                     f"{r['abs_diff_p99']:.2e}", f"{r['required_dice']} {'pass' if r['passed'] else 'FAIL'}"])
    sections.append((f"Parity vs {parity['reference']} ({parity['n_images']} images, threshold {parity['threshold']})",
                     _table(["backend", "precision", "Dice mean", "Dice min", "flip %", "abs Δp max", "abs Δp p50",
                             "abs Δp p99", "gate (mean Dice)"], rows, markdown)))
    if parity["with_truth"]:
        rows = []
        for name, r in parity["results"].items():
            if "metrics" in r:
                rows.append([name, *(f"{r['metrics'].get(k, float('nan')):.4f} "
                                     f"({r['metrics_delta_vs_reference'].get(k, 0.0):+.4f})" for k in METRIC_NAMES)])
        sections.append(("Ground-truth metrics (mean; Δ vs reference)", _table(["backend", *METRIC_NAMES], rows,
                                                                                 markdown)))
    latency = result["latency"]
    stages = latency.get("stages")
    if stages:
        rows = [[s, _fmt(stages[s].get("p50_ms")), _fmt(stages[s].get("p95_ms"))] for s in (*STAGES, "total")]
        sections.append((f"Pipeline stages, batch 1 ({latency['stage_backend']}, ms)",
                         _table(["stage", "p50", "p95"], rows, markdown)))
    dicom = latency.get("dicom_decode")
    if dicom:
        text = (f"skipped: {dicom['skipped']}" if "skipped" in dicom else
                f"p50 {_fmt(dicom.get('p50_ms'))} ms, p95 {_fmt(dicom.get('p95_ms'))} ms over "
                f"{len(dicom['per_file_ms'])} files" + (f"; unreadable: {dicom['errors']}" if dicom["errors"] else ""))
        sections.append(("DICOM decode", [text]))
    rows = []
    for name, sizes in latency["batches"].items():
        for size, s in sizes.items():
            rows.append([name, size, _fmt(s["p50_ms"]), _fmt(s["p95_ms"]), _fmt(s["per_image_ms"]),
                         _fmt(s["images_per_s"], ".1f")])
    sections.append(("Inference latency by batch size (ms per call)",
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
    acceptance = result["acceptance"]
    lines.append("onnxruntime CPU p50 <= PyTorch eager p50 (batch 1): "
                 f"{_fmt(acceptance.get('ort_cpu_p50_ms'))} vs {_fmt(acceptance.get('pytorch_p50_ms'))} ms -> "
                 f"{acceptance.get('ort_not_slower_than_pytorch', 'n/a')}")
    sections.append(("Compute", lines))
    e2e = result["end_to_end"]
    if "skipped" in e2e:
        sections.append(("End to end (lungseg-edge run --once)", [f"skipped: {e2e['skipped']}"]))
    else:
        a, s = e2e["arrival_to_sc"], e2e["sidecar_total"]
        sections.append(("End to end (lungseg-edge run --once)", [
            f"{e2e['written']}/{e2e['files']} files in {e2e['wall_s']:.1f} s = {_fmt(e2e['files_per_s'])} files/s "
            f"(exit {e2e['exit_code']}); arrival -> SC p50 {_fmt(a.get('p50_ms'), '.0f')} ms, "
            f"p95 {_fmt(a.get('p95_ms'), '.0f')} ms; edge's own per-file total p50 {_fmt(s.get('p50_ms'), '.0f')} ms",
        ]))
    sections.append(("Result", ["parity: " + ("PASSED" if result["passed"] else "FAILED")]))
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
    """Two panels: per-stage p50/p95 (batch 1) and per-image inference time by backend and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    latency = result["latency"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    stages = latency.get("stages") or {}
    names = [s for s in STAGES if stages.get(s, {}).get("n")]
    x = np.arange(len(names))
    left.bar(x - 0.2, [stages[s]["p50_ms"] for s in names], 0.4, label="p50")
    left.bar(x + 0.2, [stages[s]["p95_ms"] for s in names], 0.4, label="p95")
    left.set_xticks(x, names)
    left.set_ylabel("ms per image")
    left.set_title(f"pipeline stages, batch 1 ({latency.get('stage_backend', '-')})")
    left.legend()
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
