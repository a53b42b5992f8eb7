"""The GPU session that trained and chose the shipped model (one H100/H200, ~10 minutes).

Run from the repository root on a CUDA machine with the `[train]` dependencies:

    python docs/training_report/gpu_session.py --data samples.npz --out OUT --budget 420

``samples.npz`` comes from ``lungseg-train cache --data manifest.csv --out samples.npz --bits 8``.
Steps: (1) CUDA AMP epoch time of the paper configuration alone, for the cost of the full
25 x 2 protocol; (2) the candidate recipes, all as ordinary ``lungseg-train run`` processes
in parallel on the one GPU, stopped at the time budget; (3) the candidate with the best
stage-2 *validation* Dice (never the test data) is evaluated (Tables 1-4 on the cached
independent half) and its stage-1 and stage-2 weights saved; (4) fp16 vs fp32 parity and
latency of that model on the GPU.
Everything lands in OUT: results.json, runs.tar.gz (logs, splits, evaluations, reports),
and the chosen weights as shards of at most 16 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

COMMON = ["--repetitions", "1", "--stage2-repetitions", "2", "--device", "cuda", "--loader-workers", "2",
          "--workers", "2"]
CANDIDATES: dict[str, list[str]] = {
    # the shipped 0.1.0 recipe (paper protocol, capped epochs, batch 8)
    "paper25": ["--protocol", "paper", "--max-epochs", "25", "--stage2-max-epochs", "15", "--batch-size", "8"],
    "product": ["--protocol", "product"],
    "product_no_intensity": ["--protocol", "product", "--intensity-probability", "0"],
    "product_dice_only": ["--protocol", "product", "--loss", "dice"],
    "product_freeze_encoder": ["--protocol", "product", "--stage2-freeze", "encoder"],
}
STAGE2_ONLY = {"product_freeze_encoder": "product"}


def train_cmd(data: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "lungseg.train.cli", "run", "--data", str(data), "--out", str(out), *COMMON, *extra]


def epoch_timing(data: Path, work: Path) -> dict:
    """Stage-1 epochs of the paper configuration (batch 16) alone on the GPU."""
    out = work / "timing"
    cmd = [sys.executable, "-m", "lungseg.train.cli", "stage1", "--data", str(data), "--out", str(out),
           "--repetitions", "1", "--max-epochs", "4", "--device", "cuda", "--loader-workers", "4"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        raise RuntimeError(f"timing run failed: {done.stderr[-2000:]}")
    entries = [json.loads(x) for x in (out / "stage1/rep00/log.jsonl").read_text().splitlines()]
    return {"wall_s": time.perf_counter() - t0, "epoch_seconds": [e["seconds"] for e in entries],
            "train_images": len(json.loads((out / "stage1/rep00/split.json").read_text())["train"])}


def val_dice(run: Path, stage: str) -> float | None:
    values = []
    for done in sorted(run.glob(f"{stage}/rep*/done.json")):
        values.append(json.loads(done.read_text()).get("val_dice"))
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def shard_state(checkpoint: Path, out: Path, stem: str, limit: int = 16_000_000) -> list[str]:
    """Save a checkpoint's state dict (``torch.save`` bytes) in byte chunks under ``limit``; ``cat`` joins them."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"], buffer)
    data = buffer.getvalue()
    names = []
    for i in range(0, len(data), limit):
        name = f"{stem}.part{i // limit}"
        (out / name).write_bytes(data[i:i + limit])
        names.append(name)
    return names


def gpu_parity_and_latency(checkpoint: Path, data: Path) -> dict:
    """fp16 (autocast) vs fp32 masks and probabilities, and latency at batch 1 and 8."""
    import numpy as np
    import torch

    from lungseg.nn.checkpoint import load_checkpoint
    from lungseg.train.cache import read_cache

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = load_checkpoint(checkpoint).model.cuda().eval().to(memory_format=torch.channels_last)
    _, samples = read_cache(data)
    images = np.stack([s.image for s in list(samples.values())[:128]])
    x = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1).contiguous().cuda()
    with torch.inference_mode():
        p32 = torch.cat([model(x[i:i + 16]) for i in range(0, len(x), 16)]).float()
        half = model.half()
        p16 = torch.cat([half(x[i:i + 16].half()) for i in range(0, len(x), 16)]).float()
        model.float()
    m32, m16 = p32 >= 0.5, p16 >= 0.5
    inter = (m32 & m16).sum((1, 2, 3)).float()
    dice = (2 * inter / (m32.sum((1, 2, 3)) + m16.sum((1, 2, 3))).clamp_min(1)).cpu().numpy()
    out = {"images": len(x), "fp16_mask_dice_mean": float(dice.mean()), "fp16_mask_dice_min": float(dice.min()),
           "fp16_abs_dprob_max": float((p32 - p16).abs().max()),
           "fp16_flip_percent": float((m32 != m16).float().mean() * 100)}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        net = model.to(dtype)
        for batch in (1, 8):
            xb = x[:batch].to(dtype).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                for _ in range(10):
                    net(xb)
                torch.cuda.synchronize()
                times = []
                for _ in range(50):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    net(xb)
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
            out[f"latency_ms_{name}_batch{batch}_p50"] = float(np.median(times))
    model.float()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("gpu_runs"))
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the candidates")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny models, 1 epoch")
    args = parser.parse_args()
    if args.smoke:
        COMMON[COMMON.index("cuda")] = "cpu"
        COMMON.extend(["--init-features", "4", "--max-epochs", "1", "--stage2-max-epochs", "1"])
        CANDIDATES["paper25"] = ["--protocol", "paper"]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save = lambda: (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # noqa: E731
    try:
        import torch

        results["torch"] = torch.__version__
        results["gpu"] = torch.cuda.get_device_name(0)
        results["timing"] = epoch_timing(args.data, args.work)
    except Exception as exc:  # keep going: the candidates matter more
        results["timing_error"] = repr(exc)
    save()

    # epoch caps that fit the budget with all candidates sharing the GPU (stage-2 epochs are ~1/7 of stage 1)
    epoch_s = min(results.get("timing", {}).get("epoch_seconds", [2.0])[1:] or [2.0])
    shared = epoch_s * len(CANDIDATES) * 0.8
    cap1 = int(max(20, min(120, 0.7 * args.budget / shared)))
    cap2 = int(max(10, min(60, 0.25 * args.budget / shared * 7 / 2)))
    results["epoch_caps_product"] = [cap1, cap2]
    for name, extra in CANDIDATES.items():
        if name != "paper25" and not args.smoke:
            extra += ["--max-epochs", str(cap1), "--stage2-max-epochs", str(cap2)]
    procs: dict[str, subprocess.Popen] = {}

    def launch(name: str) -> None:
        log = (args.work / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(train_cmd(args.data, args.work / name, CANDIDATES[name]), stdout=log,
                                       stderr=log, start_new_session=True)

    t0 = time.monotonic()
    for name in CANDIDATES:
        if name not in STAGE2_ONLY:
            launch(name)
    waiting = dict(STAGE2_ONLY)
    while time.monotonic() - t0 < args.budget and (waiting or any(p.poll() is None for p in procs.values())):
        for name, parent in list(waiting.items()):  # a stage-2 variant reuses its parent's stage 1
            if procs[parent].poll() not in (None, 0):
                del waiting[name]
            elif (args.work / parent / "stage1/rep00/done.json").is_file():
                shutil.copytree(args.work / parent / "stage1", args.work / name / "stage1")
                launch(name)
                del waiting[name]
        time.sleep(2)
    for name, proc in procs.items():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            results.setdefault("stopped_at_budget", []).append(name)
    for proc in procs.values():
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    results["candidates_seconds"] = time.monotonic() - t0
    table = {}
    for name in procs:
        run = args.work / name
        table[name] = {"exit": procs[name].returncode, "stage1_val_dice": val_dice(run, "stage1"),
                       "stage2_val_dice": val_dice(run, "stage2"),
                       "stage1_epochs": [json.loads(d.read_text())["epochs_run"]
                                         for d in sorted(run.glob("stage1/rep*/done.json"))],
                       "stage2_epochs": [json.loads(d.read_text())["epochs_run"]
                                         for d in sorted(run.glob("stage2/rep*/done.json"))]}
        if procs[name].returncode not in (0, None):
            table[name]["log_tail"] = (args.work / f"{name}.log").read_text()[-1500:]
    results["candidates"] = table
    save()
    ranked = sorted((v["stage2_val_dice"], k) for k, v in table.items() if v["stage2_val_dice"] is not None)
    if not ranked:
        results["error"] = "no candidate finished stage 2"
        save()
        return 1
    chosen = ranked[-1][1]
    results["chosen"] = chosen
    run = args.work / chosen
    from lungseg.train.pipeline import best_checkpoint

    stage2 = best_checkpoint(run, "stage2")
    results["chosen_stage2_checkpoint"] = str(stage2.relative_to(args.work))
    results["weights"] = {"stage2": shard_state(stage2, args.out, "stage2")}
    stage1 = best_checkpoint(run, "stage1")
    results["weights"]["stage1"] = shard_state(stage1, args.out, "stage1")
    save()
    for name in (chosen, "paper25"):
        ev = subprocess.run([sys.executable, "-m", "lungseg.train.cli", "evaluate", "--data", str(args.data),
                             "--out", str(args.work / name), *COMMON, *CANDIDATES[name]],
                            capture_output=True, text=True, timeout=300)
        results[f"evaluate_{name}_exit"] = ev.returncode
        subprocess.run([sys.executable, "-m", "lungseg.train.cli", "report", str(args.work / name)],
                       capture_output=True, timeout=300)
        metrics = args.work / name / "evaluation/metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())["independent_overall"]
            results[f"independent_{name}"] = {s: m[s]["DICE"] for s in ("stage1", "stage2") if s in m}
        save()
    try:
        if not args.smoke:
            results["gpu_parity"] = gpu_parity_and_latency(stage2, args.data)
    except Exception as exc:
        results["gpu_parity_error"] = repr(exc)
    save()
    with tarfile.open(args.out / "runs.tar.gz", "w:gz") as tar:
        for path in sorted(args.work.rglob("*")):
            if path.is_file() and path.suffix not in (".pt", ".npz"):
                tar.add(path, arcname=str(path.relative_to(args.work)))
    shutil.rmtree(args.work / "timing", ignore_errors=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
