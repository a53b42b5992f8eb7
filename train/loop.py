"""One training stage: Adam + plateau schedule + early stopping, resumable, logged per epoch."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from lungseg import __version__
from lungseg.nn.unet import UNet
from lungseg.train.augment import geometric_augment, random_affine
from lungseg.train.config import TrainConfig
from lungseg.train.dataset import Sample, SegmentationDataset
from lungseg.train.loss import stage_loss

log = logging.getLogger(__name__)

MODEL_NAME = "lungseg-unet"
LAST = "last.pt"
BEST = "best.pt"
LOG = "log.jsonl"
DONE = "done.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch sees no CUDA GPU")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when the CPU runs bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision where it is fast: bf16 on CUDA (fp16 on GPUs without bf16), bf16 on CPUs with
    native bf16 (≈3.5x faster than fp32 there); plain fp32 on other CPUs (emulated bf16 is ≈10x slower)."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def checkpoint_payload(model: UNet, config: TrainConfig, stage: str, epoch: int, val_loss: float) -> dict:
    return {
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": {**config.to_dict(), "manifest": "/".join(Path(config.manifest).parts[-2:])},
        "stage": stage,
        "epoch": epoch,
        "val_loss": val_loss,
        "model_name": MODEL_NAME,
        "model_version": __version__,
    }


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The epoch log's entries; a line cut short by a power loss is dropped (its epoch is run again)."""
    entries: list[dict[str, Any]] = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if line.strip():
                log.warning("%s: dropping an unreadable line (a write cut short?)", path)
    return entries


@dataclass
class StageResult:
    best_path: Path
    best_epoch: int
    best_val_loss: float
    epochs_run: int


def evaluate_loss(model: UNet, loader: DataLoader, device: torch.device, config: TrainConfig,
                  threshold: float | None = None) -> float:
    """Mean validation loss; with ``threshold``, the mean per-image Dice of the thresholded mask instead."""
    model.eval()
    loss_fn = stage_loss(config.loss)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y, v in loader:
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            with autocast(device):
                p = model(x).float()
            y, v = y.to(device), v.to(device)
            if threshold is None:
                total += float(loss_fn(p, y, v, config)) * len(x)
            else:
                m = (p >= threshold).float() * v
                t = y * v
                inter, sums = (m * t).sum((1, 2, 3)), m.sum((1, 2, 3)) + t.sum((1, 2, 3))
                total += float(torch.where(sums > 0, 2 * inter / sums.clamp_min(1), torch.ones_like(sums)).sum())
            count += len(x)
    return total / max(count, 1)


def freeze(model: UNet, part: str) -> None:
    """Stage-2 layer freezing: ``encoder`` keeps the encoder and bottleneck at their stage-1 weights."""
    if part == "none":
        return
    if part != "encoder":
        raise ValueError(f"unknown freeze option {part!r} (none, encoder)")
    for name, parameter in model.named_parameters():
        if name.startswith(("encoder", "bottleneck")):
            parameter.requires_grad_(False)


def train_stage(
    model: UNet,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    config: TrainConfig,
    run_dir: Path,
    stage: str,
    seed: int,
) -> StageResult:
    """Train ``model`` in place; the best-validation weights are restored at the end.

    ``run_dir`` receives ``log.jsonl`` (one line per epoch), ``last.pt`` (resume
    point, written every epoch), ``best.pt`` and ``done.json``. If ``done.json``
    exists the stage is not rerun; if ``last.pt`` exists training resumes from it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / DONE
    if done.is_file():
        info = json.loads(done.read_text())
        model.load_state_dict(torch.load(run_dir / BEST, map_location="cpu", weights_only=True)["model"])
        log.info("%s: already complete (best epoch %s), skipping", run_dir, info["best_epoch"])
        return StageResult(run_dir / BEST, info["best_epoch"], info["best_val_loss"], info["epochs_run"])

    device = resolve_device(config.device)
    seed_everything(seed)
    model.to(device).to(memory_format=torch.channels_last)
    if stage == "stage2":
        freeze(model, config.stage2_freeze)
    loss_fn = stage_loss(config.loss)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr_for(stage))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience
    )
    generator = torch.Generator().manual_seed(seed)
    per_sample_rotation = config.geometry == "sample"
    train_loader = DataLoader(
        SegmentationDataset(train_samples, config.rotation_degrees if per_sample_rotation else 0.0,
                            config.rotation_probability, seed, config.intensity_probability,
                            config.electrode_probability),
        batch_size=config.batch_size, shuffle=True, generator=generator,
        drop_last=len(train_samples) > config.batch_size, num_workers=config.loader_workers,
        pin_memory=device.type == "cuda",
    )
    val_loader = DataLoader(SegmentationDataset(val_samples), batch_size=config.batch_size,
                            num_workers=config.loader_workers)

    start_epoch, best_val, best_epoch, since_best = 1, float("inf"), 0, 0
    best_state: dict[str, torch.Tensor] | None = None
    last = run_dir / LAST
    if last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best_val, best_epoch, since_best = (
            state["epoch"] + 1, state["best_val"], state["best_epoch"], state["since_best"]
        )
        best_state = torch.load(run_dir / BEST, map_location="cpu", weights_only=True)["model"]
        log.info("%s: resuming at epoch %d (best %.4f at %d)", run_dir, start_epoch, best_val, best_epoch)
    # a kill between an epoch's log line and its last.pt (even the first epoch's, when there is
    # no last.pt yet) leaves log lines for epochs that will be run again: drop them
    if (run_dir / LOG).is_file():
        kept = [e for e in _read_log(run_dir / LOG) if e["epoch"] < start_epoch]
        (run_dir / LOG).write_text("".join(json.dumps(e) + "\n" for e in kept))

    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs_for(stage) + 1):
        if since_best >= config.patience:
            epoch -= 1
            break
        t0 = time.perf_counter()
        model.train()
        train_loader.dataset.epoch = epoch
        affine_generator = torch.Generator().manual_seed(seed * 100003 + epoch)
        running, seen = 0.0, 0
        bar = tqdm(train_loader, desc=f"{stage} epoch {epoch}", leave=False, mininterval=2.0,
                   disable=None)
        for x, y, v in bar:
            x, y, v = x.to(device, non_blocking=True), y.to(device, non_blocking=True), v.to(device, non_blocking=True)
            if not per_sample_rotation:
                theta = random_affine(len(x), config.rotation_degrees, config.scale_range,
                                      config.translate_fraction, config.rotation_probability, affine_generator)
                x, y, v = geometric_augment(x, y, v, theta)
            x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                p = model(x)
            loss = loss_fn(p, y, v, config)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(x)
            seen += len(x)
            bar.set_postfix(loss=f"{running / seen:.4f}")
        train_loss = running / max(seen, 1)
        val_loss = evaluate_loss(model, val_loader, device, config)
        scheduler.step(val_loss)
        improved = val_loss < best_val
        if improved:
            best_val, best_epoch, since_best = val_loss, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            atomic_save(checkpoint_payload(model, config, stage, epoch, val_loss), run_dir / BEST)
        else:
            since_best += 1
        entry = {
            "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
            "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
            "best": improved,
        }
        with (run_dir / LOG).open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        log.info("%s epoch %d: train %.4f val %.4f (%.0f s)%s", stage, epoch, train_loss, val_loss,
                 entry["seconds"], " *" if improved else "")
        atomic_save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": epoch, "best_val": best_val, "best_epoch": best_epoch, "since_best": since_best,
        }, last)

    if best_state is None:
        raise RuntimeError(f"{run_dir}: no epoch was run (max_epochs={config.epochs_for(stage)})")
    model.load_state_dict(best_state)
    val_dice = evaluate_loss(model, val_loader, device, config, threshold=config.threshold)
    model.to("cpu").to(memory_format=torch.contiguous_format)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    info = {"best_epoch": best_epoch, "best_val_loss": best_val, "epochs_run": epoch, "val_dice": val_dice,
            "seconds": sum(e["seconds"] for e in _read_log(run_dir / LOG))}
    done.write_text(json.dumps(info, indent=2) + "\n")
    last.unlink(missing_ok=True)
    return StageResult(run_dir / BEST, best_epoch, best_val, epoch)
