"""One ``lungseg-bench`` run: the DICOM edge path, parity, latency, compute, acceptance rows and verdict.

:mod:`lungseg.benchmarks.cli` parses the arguments and maps the verdict to an exit code;
this module does the work and writes the files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lungseg
from lungseg.bundle import Bundle, ModelNotFoundError, resolve_bundle
from lungseg.export.parity import DEFAULT_MIN_DICE_FP32, DEFAULT_MIN_DICE_REDUCED
from lungseg.export.samples import (
    DICOM_SUFFIXES,
    SHARED_DICOM_DIR,
    Sample,
    SampleSourceError,
    describe_source,
    load_samples,
    model_batch,
)
from lungseg.gate import load_gate
from lungseg.predictors import OnnxRuntimePredictor, Predictor

from . import cpu_backends, dicom_path, latency, system
from .acceptance import Bound, row, verdict
from .backends import CHECKPOINT_NAME, CPU_FP32, REFERENCE, Backend, discover
from .compute import count_conv_flops, gemm_gflops, latency_floor
from .dicom_samples import BIG_J2K, BIG_UNCOMPRESSED, GENERATED, generated_set, pick, small_set
from .parity import run_parity
from .progress import track
from .report import latency_plot, markdown_report, text_report

log = logging.getLogger(__name__)

# the errors of an unusable --model or --data: a usage error, not a crash
UNUSABLE_INPUT = (ModelNotFoundError, SampleSourceError)


def load_inputs(args: argparse.Namespace) -> tuple[Bundle, list[Sample]]:
    """The model bundle and the benchmark images; raises one of :data:`UNUSABLE_INPUT`."""
    return resolve_bundle(args.model), load_samples(args.data, limit=args.n)


def _dicom_files(args: argparse.Namespace, images: list[Any], work: Path) -> tuple[list[Path], str]:
    """DICOM files for the stage tables and parity, and where they came from (generated when none)."""
    for folder in (args.dicom, args.data, SHARED_DICOM_DIR):
        if folder is not None and folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in DICOM_SUFFIXES)
            if files:
                return files, describe_source(folder)
    return generated_set(images, work / "generated"), "generated from the benchmark images"


def _name(path: Path | None) -> str | None:
    return path.name if path is not None else None


def _dicom_path(args: argparse.Namespace, bundle: Bundle, predictor: Predictor, images: list[Any], threads: int,
                work: Path, bounds: dict[str, Bound],
                yardstick_batch: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage tables, burst and mask parity of the DICOM edge path, and its acceptance rows (the yardstick:
    ``predictor``, the fp32 onnxruntime CPU session, on one image of ``yardstick_batch``)."""
    dicoms, source = _dicom_files(args, images, work)
    result: dict[str, Any] = {"source": source, "files": [p.name for p in dicoms]}
    gate = dicom_path.ACCEPT_MASK_DICE if args.min_dice_dicom is None else args.min_dice_dicom
    result["mask_parity"] = dicom_path.mask_parity(dicoms, predictor, min_dice=gate, gate=load_gate(bundle.root))
    if args.skip_e2e:
        result["stages"] = result["burst"] = {"skipped": "--skip-e2e"}
    else:
        result["stages"] = dicom_path.stage_comparison(dicoms, bundle.root, copies=args.copies, threads=threads)
        result["burst"] = (dicom_path.burst_comparison(small_set(images, work / "small"), args.burst, bundle.root,
                                                       threads=threads)
                           if args.burst > 0 else {"skipped": "--burst 0"})
    j2k = pick(dicoms, BIG_J2K, GENERATED[0][0])
    result["yardstick_ms"] = dicom_path.yardstick_ms(predictor, yardstick_batch)
    result["library_decode_ms"] = dicom_path.library_decode_ms(j2k) if j2k is not None else None
    rows = dicom_path.acceptance(result["stages"], result["burst"], result["mask_parity"], _name(j2k),
                                 _name(pick(dicoms, BIG_UNCOMPRESSED, GENERATED[1][0])), bounds,
                                 yardstick=result["yardstick_ms"], library_ms=result["library_decode_ms"])
    return result, rows


def _compute(bundle: Bundle, backends: dict[str, Backend], threads: int) -> dict[str, Any]:
    try:  # torch is the [train] extra: without it the FLOPs are not counted
        from lungseg.nn.unet import UNet
    except ImportError as exc:
        return {"skipped": f"torch is not installed ({exc})"}
    reference = backends.get(REFERENCE)
    model = (reference.predictor.model if reference is not None and reference.available  # type: ignore[union-attr]
             else UNet(init_features=int(bundle.metadata.get("init_features", 32))))
    flops = count_conv_flops(model)
    flops["init_features"] = int(model.encoder1.enc1conv1.weight.shape[0])
    flops["gemm_gflops"] = gemm_gflops(threads)
    flops.update(latency_floor(flops["flops"], flops["gemm_gflops"]))
    return flops


def _ort_vs_pytorch(batches: dict[str, Any], backends: dict[str, Backend], bound: Bound) -> dict[str, Any]:
    """The acceptance row: onnxruntime CPU fp32 p50 over PyTorch eager p50 at batch 1."""
    ort_p50 = batches.get(CPU_FP32, {}).get("1", {}).get("p50_ms")
    torch_p50 = batches.get(REFERENCE, {}).get("1", {}).get("p50_ms")
    skipped = None
    if not backends[REFERENCE].available:
        skipped = f"no PyTorch backend ({backends[REFERENCE].reason})"
    elif "1" not in batches.get(REFERENCE, {}):
        skipped = "batch size 1 was not timed (--batch-sizes)"
    value = ort_p50 / torch_p50 if ort_p50 and torch_p50 else None
    return row(bound, value, skipped=skipped, missing="no batch-1 p50 for onnxruntime-cpu", ort_cpu_p50_ms=ort_p50,
               pytorch_p50_ms=torch_p50)


def run(args: argparse.Namespace, bundle: Bundle, samples: list[Sample], bounds: dict[str, Bound]) -> dict[str, Any]:
    """The whole benchmark: the result, with its acceptance rows and ``verdict`` (not yet its exit code)."""
    threads = args.threads or system.usable_cores()
    progress = not args.no_progress and sys.stderr.isatty()
    min_fp32 = DEFAULT_MIN_DICE_FP32 if args.min_dice_fp32 is None else args.min_dice_fp32
    min_reduced = DEFAULT_MIN_DICE_REDUCED if args.min_dice_reduced is None else args.min_dice_reduced
    checkpoint = args.checkpoint or bundle.root / CHECKPOINT_NAME

    batch, geometries = model_batch(samples)
    # The DICOM edge path first, before PyTorch and the other backends are loaded: in service the
    # daemon runs alone (it never loads torch), and an idle 3 GB process beside it slowed the
    # daemon's JPEG 2000 decode by about a fifth on the machine the figures come from.
    with tempfile.TemporaryDirectory(prefix="lungseg-bench-") as tmp:
        dicom, rows = _dicom_path(args, bundle, OnnxRuntimePredictor(str(bundle.onnx), device="cpu", threads=threads),
                                  [s.pixels for s in samples], threads, Path(tmp), bounds, batch)
    backends = {b.name: b for b in discover(bundle, checkpoint, threads)}
    parity = run_parity(list(backends.values()), batch, geometries, samples, min_dice_fp32=min_fp32,
                        min_dice_reduced=min_reduced, progress=progress,
                        bundle_root=bundle.root if args.model is None or args.model.is_dir() else None)

    timing: dict[str, Any] = {"threads": threads, "batches": {}}
    available = [b for b in backends.values() if b.available]
    for backend in track(available, "latency", "backend", enabled=progress):
        timing["batches"][backend.name] = latency.batch_latency(backend.predictor, batch, batch_sizes=args.batch_sizes,
                                                                repeats=args.repeats)
    compute = _compute(bundle, backends, threads)
    cpu_side_by_side = cpu_backends.compare_cpu(bundle, list(backends.values()), batch, threads=threads,
                                                rounds=args.cpu_rounds)
    rows["ort_cpu_vs_pytorch_p50"] = _ort_vs_pytorch(timing["batches"], backends, bounds["ort_cpu_vs_pytorch_p50"])
    rows.update(cpu_backends.acceptance_rows(cpu_side_by_side, bounds, system.cpu_features()))
    timing["memory"] = latency.peak_memory()
    golden = parity["golden"]
    result: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lungseg_version": lungseg.__version__,
        "reference": {
            "backend": parity["reference"],
            "description": parity["reference_description"],
            "golden_set": (f"{golden['source']}: {golden['reference']} ({golden['n_images']} images)"
                           if "results" in golden else f"FAILED: {golden['error']}" if "error" in golden
                           else f"not checked: {golden['skipped']}"),
        },
        "machine": system.machine(threads),
        "versions": system.versions(),
        "model": {"bundle": describe_source(bundle.root), "name": bundle.name, "version": bundle.version,
                  "checkpoint": checkpoint.name if backends[REFERENCE].available else None},
        "data": {"source": describe_source(args.data), "n_images": len(samples),
                 "with_masks": parity["with_truth"]},
        "thresholds": {"fp32": min_fp32, "reduced": min_reduced},
        "backends": {name: b.describe() for name, b in backends.items()},
        "parity": parity,
        "latency": timing,
        "compute": compute,
        "cpu_backends": cpu_side_by_side,
        "acceptance": rows,
        "dicom_path": dicom,
    }
    result["verdict"] = verdict(result)
    result["passed"] = result["verdict"]["passed"]
    return result


def write_files(result: dict[str, Any], *, json_path: Path | None, markdown: Path | None,
                plot: Path | None) -> None:
    """The result as JSON, a Markdown report and a latency plot, where asked (folders created)."""
    for path in (json_path, markdown, plot):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    if markdown:
        markdown.write_text(markdown_report(result) + "\n")
    if plot:
        latency_plot(result, plot)


__all__ = ["run", "text_report", "write_files"]
