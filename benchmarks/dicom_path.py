"""The DICOM edge path, stage by stage, with today's defaults against 0.1.0's path, in one run.

* **Stages.** Every DICOM file (the real ones when present, generated ones otherwise) goes
  ``copies`` times (plus one warm-up file, not counted) through ``lungseg-edge run --once
  --batch-size 1``, twice: with the
  defaults, and as 0.1.0 ran: :data:`LEGACY_ARGS` (full-resolution decode, native-size
  postprocessing, RLE SC decoded back in full) on the fp32 model alone
  (:func:`legacy_bundle`; the defaults use whatever the bundle's self-tested chain picks,
  int8 where it passes). Per file and stage the
  median over the copies is reported, and ``non_inference / infer`` (decode + preprocess +
  postprocess + QA + write, write including publish and ledger commit, over inference; the
  image gate's time is reported beside it, and added in ``ratio_with_gate``).
* **Burst.** ``burst`` small (512 px) uncompressed files through one ``--once`` run, with
  the defaults and with :data:`LEGACY_ARGS`: throughput ratio and the daemon's peak RSS.
* **Mask parity.** The final native-size mask of the default path against the 0.1.0 path
  (full-resolution decode and native-size postprocessing), same predictor, per file.

Ratios are measured in the same run, so they hold on any machine; the CPU's feature flags
are recorded beside them.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from lungseg.dicom_decode import read_dicom
from lungseg.edge_runtime.config import EdgeConfig
from lungseg.gate import GatePolicy, gated_segment
from lungseg.imaging import UnreadableImageError
from lungseg.metrics import dice
from lungseg.postprocess import PostprocessConfig

from . import end_to_end
from .acceptance import BOUNDS, PARITY, Bound, row

log = logging.getLogger(__name__)

LEGACY_ARGS = ("--decode-min-side", "0", "--postprocess-resolution", "native", "--sc-syntax", "rle",
               "--sc-verify", "decode")
STAGES = ("decode", "preprocess", "gate", "infer", "postprocess", "qa", "write")
# everything but a model's inference; the image gate (a second, small model: its input resize and its
# inference, about 5% of the segmenter's time) is shown apart and in ``ratio_with_gate``
NON_INFERENCE = ("decode", "preprocess", "postprocess", "qa", "write")
ACCEPT_MASK_DICE = 0.995  # the mask parity gate; the performance rows' bounds are in acceptance.BOUNDS
_BURST_NAME = re.compile(r"burst-\d+-(?P<stem>.+)\.dcm$")


LEGACY_BUNDLE_FILES = ("model.onnx", "parity.json", "MODEL_CARD.md")


def legacy_bundle(bundle: Path, folder: Path) -> Path:
    """A bundle as 0.1.0 used it on a CPU: the fp32 model only (no int8 variant, golden set or gate)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in LEGACY_BUNDLE_FILES:
        source = bundle / name
        if source.is_file():
            try:
                (folder / name).symlink_to(source.resolve())
            except OSError:
                shutil.copyfile(source, folder / name)
    return folder


def per_file_stages(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Median stage timings per source file of one :func:`end_to_end.run_edge` run."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in run.get("per_file", [])[1:]:  # the first file processed is the run's warm-up
        match = _BURST_NAME.search(str(record.get("file") or ""))
        if match:
            grouped.setdefault(match["stem"] + ".dcm", []).append(record)
    table = {}
    for name, records in sorted(grouped.items()):
        stages = {s: float(np.median([r["timings_ms"].get(s, 0.0) for r in records])) for s in STAGES}
        parts = sorted({k for r in records for k in r.get("write_stages_ms", {})})
        write_parts = {k: float(np.median([r["write_stages_ms"].get(k, 0.0) for r in records])) for k in parts}
        non_inference = sum(stages[s] for s in NON_INFERENCE)
        infer = stages["infer"]
        table[name] = {"n": len(records), "stages_ms": stages, "write_parts_ms": write_parts,
                       "non_inference_ms": non_inference,
                       "ratio_non_inference_to_infer": non_inference / infer if infer else None,
                       "ratio_with_gate": (non_inference + stages["gate"]) / infer if infer else None}
    return table


#: the defaults without the overlay SC (SEG + SR only): the fast path's stage table
SC_OFF_ARGS: tuple[str, ...] = ("--no-sc",)


def _both_paths(bundle: Path, prefix: str, *,
                sc_off: bool = False) -> Iterator[tuple[str, tuple[str, ...], Path, Path]]:
    """``(label, extra args, bundle, work folder)`` for the defaults, (``sc_off``: then without the SC,) then
    the 0.1.0 path, each with a temp folder of its own (removed when the caller moves on)."""
    paths = (("default", ()), *((("sc_off", SC_OFF_ARGS),) if sc_off else ()), ("legacy", LEGACY_ARGS))
    for label, extra in paths:
        with tempfile.TemporaryDirectory(prefix=f"lungseg-{prefix}-{label}-") as tmp:
            work = Path(tmp)
            yield label, extra, (bundle if label == "default" else legacy_bundle(bundle, work / "bundle")), work


def stage_comparison(sources: Sequence[Path], bundle: Path, *, copies: int, threads: int | None,
                     backend: str = "cpu") -> dict[str, Any]:
    """Stage tables of the default and the 0.1.0 path (one ``--once`` run each, batch size 1)."""
    result: dict[str, Any] = {"copies": copies, "legacy_args": " ".join(LEGACY_ARGS),
                              "sc_off_args": " ".join(SC_OFF_ARGS)}
    for label, extra, model, work in _both_paths(bundle, "stages", sc_off=True):
        run = end_to_end.run_edge(sources, copies * len(sources) + 1, model, work, backend=backend,
                                  threads=threads, extra_args=("--batch-size", "1", *extra))
        if "skipped" in run:
            return {"skipped": run["skipped"]}
        result[label] = {"exit_code": run["exit_code"], "written": run["written"], "files": run["files"],
                         "backend": run["backend"], "peak_rss_mib": run["peak_rss_mib"],
                         "per_file": per_file_stages(run)}
        if "stderr_tail" in run:
            result[label]["stderr_tail"] = run["stderr_tail"]
    return result


def burst_comparison(sources: Sequence[Path], n: int, bundle: Path, *, threads: int | None,
                     backend: str = "cpu") -> dict[str, Any]:
    """Throughput and peak RSS of ``n`` files with the defaults and with the 0.1.0 path."""
    result: dict[str, Any] = {"files": n, "sources": sorted(s.name for s in sources),
                              "legacy_args": " ".join(LEGACY_ARGS)}
    for label, extra, model, work in _both_paths(bundle, "burst"):
        run = end_to_end.run_burst(sources, n, model, work, backend=backend, threads=threads, extra_args=extra)
        if "skipped" in run:
            return {"skipped": run["skipped"]}
        result[label] = run
    default, legacy = result["default"].get("files_per_s"), result["legacy"].get("files_per_s")
    result["speedup"] = default / legacy if default and legacy else None
    return result


def mask_parity(sources: Sequence[Path], predictor: Any, *, min_side: int | None = None, threshold: float = 0.5,
                min_dice: float = ACCEPT_MASK_DICE, gate: Any = None) -> dict[str, Any]:
    """Dice of the default path's native-size mask against the 0.1.0 path's, per file.

    Both paths go through the bundle's image gate (``gate``) first, as the product does, so an
    upside-down or negative file is compared on the image that is actually segmented.
    """
    policy = GatePolicy(mode="flag")
    if min_side is None:
        min_side = EdgeConfig().decode_min_side  # the edge's default

    per_file: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for path in sources:
        try:
            full = read_dicom(path)
            reduced = read_dicom(path, min_side=min_side)
        except UnreadableImageError as exc:
            errors[path.name] = exc.reason
            continue
        legacy = gated_segment(predictor, gate, [full], PostprocessConfig(threshold=threshold, resolution="native"),
                               policy)[0]
        default = gated_segment(predictor, gate, [reduced], PostprocessConfig(threshold=threshold), policy)[0]
        per_file[path.name] = {"dice": dice(legacy.mask, default.mask), "native": list(full.shape),
                               "decoded": list(reduced.shape), "level": reduced.facts.get("decoded_level", 0)}
    values = [v["dice"] for v in per_file.values()]
    return {"min_side": min_side, "per_file": per_file, "errors": errors, "gate": min_dice,
            "dice_mean": float(np.mean(values)) if values else None,
            "dice_min": float(np.min(values)) if values else None,
            "passed": bool(values) and float(np.mean(values)) >= min_dice}


def yardstick_ms(predictor: Any, batch: np.ndarray, runs: int = 7) -> float:
    """Median time of one image through ``predictor`` (the fp32 onnxruntime CPU session), after one warm-up."""
    one = batch[:1]
    predictor.predict(one)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        predictor.predict(one)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def library_decode_ms(path: Path, runs: int = 3) -> float:
    """Median time of pydicom's own decode of ``path`` (``pixel_array``, the same plugin the edge uses)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        pydicom.dcmread(path).pixel_array  # noqa: B018 - the decode is what is timed
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def acceptance(stages: dict[str, Any], burst: dict[str, Any], parity: dict[str, Any], j2k: str | None,
               uncompressed: str | None, bounds: dict[str, Bound] | None = None, *,
               yardstick: float | None = None, library_ms: float | None = None) -> dict[str, Any]:
    """The DICOM path's acceptance rows (:func:`acceptance.row`), each with its bound and whether it holds.

    Rows of a skipped measurement (``--skip-e2e``, ``--burst 0``, no lungseg-edge, no file of that kind
    in the DICOM set: ``j2k``/``uncompressed`` is ``None``) are not measured; a measurement that ran but
    left no figure (a crashed run, a file without stage timings) fails.
    """
    bounds = BOUNDS if bounds is None else bounds
    out: dict[str, Any] = {}
    table = stages.get("default", {}).get("per_file", {})
    legacy = stages.get("legacy", {}).get("per_file", {})
    big = table.get(j2k or "")
    skipped = stages.get("skipped") or (None if j2k else "the DICOM set has no such file")
    after_decode = big["non_inference_ms"] - big["stages_ms"]["decode"] if big else None
    out["j2k_after_decode"] = row(bounds["j2k_after_decode"],
                                  after_decode / yardstick if after_decode is not None and yardstick else None,
                                  skipped=skipped, missing=f"no stage timings for {j2k}", file=j2k,
                                  after_decode_ms=after_decode, yardstick_ms=yardstick)
    decode = big["stages_ms"]["decode"] if big else None
    out["j2k_decode_vs_library"] = row(bounds["j2k_decode_vs_library"],
                                       decode / library_ms if decode is not None and library_ms else None,
                                       skipped=skipped, missing=f"no decode timing for {j2k}", file=j2k,
                                       decode_ms=decode, library_decode_ms=library_ms)
    entry = table.get(uncompressed or "")
    skipped = stages.get("skipped") or (None if uncompressed else "the DICOM set has no such file")
    out["uncompressed_vs_yardstick"] = row(
        bounds["uncompressed_vs_yardstick"],
        entry["non_inference_ms"] / yardstick if entry and yardstick else None, skipped=skipped,
        missing=f"no stage timings for {uncompressed}", file=uncompressed,
        non_inference_ms=entry["non_inference_ms"] if entry else None, yardstick_ms=yardstick,
        legacy=(legacy.get(uncompressed or "") or {}).get("non_inference_ms"))
    sc_off = (stages.get("sc_off", {}).get("per_file", {}) or {}).get(j2k or "")
    skipped = stages.get("skipped") or (None if j2k else "the DICOM set has no such file")
    if not stages.get("skipped") and "sc_off" not in stages:
        skipped = "no --no-sc run in this stage table"
    out["sc_off_vs_yardstick"] = row(
        bounds["sc_off_vs_yardstick"], sc_off["non_inference_ms"] / yardstick if sc_off and yardstick else None,
        skipped=skipped, missing=f"no --no-sc stage timings for {j2k}", file=j2k,
        non_inference_ms=sc_off["non_inference_ms"] if sc_off else None, yardstick_ms=yardstick)
    default = burst.get("default", {})
    out["burst_speedup"] = row(bounds["burst_speedup"], burst.get("speedup"), skipped=burst.get("skipped"),
                               missing="the burst wrote no files on one of the paths")
    out["daemon_peak_rss_mib"] = row(bounds["daemon_peak_rss_mib"], default.get("peak_rss_mib"),
                                     skipped=burst.get("skipped"), missing="the daemon's RSS could not be sampled",
                                     worker=default.get("worker_peak_rss_mib"))
    out["mask_dice_mean"] = row(Bound(">=", parity.get("gate", ACCEPT_MASK_DICE), "native-size mask, mean Dice"),
                                parity.get("dice_mean"), kind=PARITY, missing="no DICOM file could be compared",
                                min=parity.get("dice_min"))
    return out
