"""Train the image gate, score it per class on held-out patients, export ``gate.onnx`` with a parity check.

Outputs in the run folder: ``samples_train.npz`` / ``samples_heldout.npz`` (cached renders),
``gate.pt`` (checkpoint), ``gate.onnx``, ``gate.json`` (version, sha256, parity, held-out accuracy).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lungseg.atomic import atomic_write
from lungseg.bundle import sha256_file
from lungseg.export.gate_export import check_parity, export_onnx
from lungseg.gate import GATE_INPUT_NAME, GATE_ONNX, GATE_OUTPUT_NAME, GATE_SIZE, HEADS, GateScores, dihedral
from lungseg.nn.gate_net import GATE_VERSION, GateNet, torch_logits
from lungseg.train.gate_data import (
    NONCHEST_HELDOUT,
    NONCHEST_TRAIN,
    GateSamples,
    build_samples,
    find_nonchest,
    gate_split,
)

log = logging.getLogger("lungseg.train.gate")

CHECKPOINT = "gate.pt"
MANIFEST = "gate.json"


@dataclass
class GateTrainConfig:
    manifest: str
    epochs: int = 14
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 1
    bf16: bool = True


def _samples(path: Path, make: Any) -> GateSamples:
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        return GateSamples(x=data["x"], chest=data["chest"], negative=data["negative"],
                           base_id=[str(s) for s in data["base_id"]])
    samples = make()
    np.savez(path, x=samples.x, chest=samples.chest, negative=samples.negative, base_id=np.array(samples.base_id))
    return samples


def _batch(samples: GateSamples, index: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    xs, turns, mirrors = [], [], []
    for i in index:
        k, m = int(rng.integers(0, 4)), bool(rng.random() < 0.5)
        xs.append(dihedral(samples.x[i].astype(np.float32), k, m))
        turns.append(k)
        mirrors.append(int(m))
    return (np.stack(xs), np.array(turns), samples.negative[index], np.array(mirrors), samples.chest[index])


def _loss(logits: torch.Tensor, turns: torch.Tensor, negative: torch.Tensor, mirrored: torch.Tensor,
          chest: torch.Tensor) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    loss = ce(logits[:, HEADS["chest"]], chest)
    is_chest = chest == 1
    if bool(is_chest.any()):
        sub = logits[is_chest]
        loss = loss + ce(sub[:, HEADS["orientation"]], turns[is_chest])
        loss = loss + ce(sub[:, HEADS["negative"]], negative[is_chest])
        loss = loss + ce(sub[:, HEADS["mirrored"]], mirrored[is_chest])
    return loss


def train(out: Path, config: GateTrainConfig) -> dict[str, Any]:
    """The whole gate run; returns the manifest written to ``gate.json``."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    split = gate_split(config.manifest, seed=0)
    log.info("gate split: %d training / %d held-out radiographs (%d / %d patients)", len(split.train),
             len(split.heldout), len({r.patient_id for r in split.train}), len({r.patient_id for r in split.heldout}))
    t0 = time.perf_counter()
    train_set = _samples(out / "samples_train.npz", lambda: build_samples(
        split.train, find_nonchest(NONCHEST_TRAIN), seed=config.seed))
    held_set = _samples(out / "samples_heldout.npz", lambda: build_samples(
        split.heldout, find_nonchest(NONCHEST_HELDOUT), variants=1, nonchest_variants=20, synthetic=100,
        seed=config.seed + 1))
    log.info("samples: %d training, %d held-out (%.0f s)", len(train_set.chest), len(held_set.chest),
             time.perf_counter() - t0)
    t_train = time.perf_counter()
    model, history = fit(train_set, config)
    torch.save({"state_dict": model.state_dict(), "version": GATE_VERSION, "config": asdict(config)},
               out / CHECKPOINT)
    accuracy = heldout_accuracy(lambda x: torch_logits(model, x), held_set)
    onnx_path = export_onnx(model, out / GATE_ONNX)
    parity = check_parity(model, onnx_path, held_set.x)

    manifest = {
        "name": "lungseg-gate", "version": GATE_VERSION, "file": GATE_ONNX, "sha256": sha256_file(onnx_path),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {"name": GATE_INPUT_NAME, "shape": ["N", 1, GATE_SIZE, GATE_SIZE],
                  "transform": "lungseg.gate.gate_input (the segmenter's preprocessed input, area-downscaled)"},
        "output": {"name": GATE_OUTPUT_NAME, "heads": {k: [v.start, v.stop] for k, v in HEADS.items()}},
        "data": {"manifest": Path(config.manifest).name, "train_radiographs": len(split.train),
                 "heldout_radiographs": len(split.heldout), "train_samples": len(train_set.chest),
                 "heldout_samples": len(held_set.chest), "nonchest_train": list(NONCHEST_TRAIN),
                 "nonchest_heldout": list(NONCHEST_HELDOUT)},
        "training": {**asdict(config), "seconds": round(time.perf_counter() - t_train, 1), "history": history},
        "heldout_accuracy": accuracy,
        "parity": parity,
    }
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def fit(train_set: GateSamples, config: GateTrainConfig) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train a fresh :class:`GateNet` on ``train_set`` (random pose per sample and batch); eval mode."""
    torch.manual_seed(config.seed)
    model = GateNet().to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * int(np.ceil(len(train_set.chest) / config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr, total_steps=steps)
    rng = np.random.default_rng(config.seed)
    history = []
    t_train = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = rng.permutation(len(train_set.chest))
        total, count = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            x, k, neg, mir, chest = _batch(train_set, order[start:start + config.batch_size], rng)
            xt = torch.from_numpy(x).to(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                logits = model(xt)
            loss = _loss(logits.float(), *(torch.from_numpy(a).long() for a in (k, neg, mir, chest)))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
            if (start // config.batch_size) % 20 == 0:
                log.debug("gate epoch %d step %d: loss %.4f", epoch + 1, start // config.batch_size, float(loss))
        history.append({"epoch": epoch + 1, "loss": total / count, "seconds": time.perf_counter() - t_train})
        log.info("gate epoch %d/%d: loss %.4f (%.0f s)", epoch + 1, config.epochs, total / count,
                 time.perf_counter() - t_train)
    return model.eval(), history


def heldout_accuracy(logits_of: Any, samples: GateSamples) -> dict[str, Any]:
    """Per-head accuracy on held-out samples, every chest seen in all 8 dihedral poses."""
    chest_idx = np.nonzero(samples.chest == 1)[0]
    other_idx = np.nonzero(samples.chest == 0)[0]
    correct: dict[str, list[bool]] = {"orientation": [], "negative": [], "mirrored": [], "chest_on_chests": []}
    per_turn: dict[int, list[bool]] = {k: [] for k in range(4)}
    for k in range(4):
        for m in (False, True):
            x = np.stack([dihedral(samples.x[i].astype(np.float32), k, m) for i in chest_idx])
            scores = [GateScores.from_logits(row) for row in logits_of(x)]
            for s, i in zip(scores, chest_idx, strict=True):
                correct["orientation"].append(s.quarter_turns == k)
                per_turn[k].append(s.quarter_turns == k)
                correct["negative"].append((s.negative >= 0.5) == bool(samples.negative[i]))
                correct["mirrored"].append((s.mirrored >= 0.5) == m)
                correct["chest_on_chests"].append(s.chest >= 0.5)
    other = [GateScores.from_logits(row) for row in logits_of(samples.x[other_idx].astype(np.float32))]
    by_source: dict[str, list[bool]] = {}
    for s, i in zip(other, other_idx, strict=True):
        source = samples.base_id[i]
        kind = ("synthetic" if source.startswith("synthetic") else
                "real_non_chest" if source.endswith(".dcm") else "radiograph_crop")
        by_source.setdefault(kind, []).append(s.chest < 0.5)
    report = {name: round(float(np.mean(v)), 4) for name, v in correct.items()}
    report["orientation_by_turns"] = {str(k * 90): round(float(np.mean(v)), 4) for k, v in per_turn.items()}
    report["not_chest_by_source"] = {k: {"accuracy": round(float(np.mean(v)), 4), "n": len(v)}
                                     for k, v in by_source.items()}
    report["n_chest_images"] = len(chest_idx)
    report["n_chest_evaluations"] = len(correct["orientation"])
    return report
