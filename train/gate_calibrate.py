"""The gate's mirror threshold, chosen on the training patients alone (out-of-fold scores).

The mirror head is the gate's weakest (a mirrored chest differs from an upright one mainly by
the side of the heart, the aortic knob and the gastric bubble), so its threshold sets most of the
gate's false alarms. Choosing it on held-out patients would spend the images the gate is scored
on; choosing it on the final gate's own training images would trust over-confident scores.
Instead the training patients are split into ``folds`` patient-disjoint parts; for each, a gate
is trained with the same configuration on the other parts' samples and scores the part's
radiographs as stored and mirrored, through :func:`lungseg.gate.consensus_logits` as the runtime
does. The threshold is the lowest probability that flags at most ``budget`` of these unaltered
out-of-fold images; the recall on their mirror images is reported beside it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.atomic import atomic_write
from lungseg.data import split_by_patient
from lungseg.gate import consensus_logits, gate_input_from_pixels, mirror_evidence
from lungseg.imaging import read_image
from lungseg.nn.gate_net import torch_logits
from lungseg.train.gate_data import NONCHEST_TRAIN, GateSamples, build_samples, find_nonchest, gate_split
from lungseg.train.gate_train import MANIFEST, GateTrainConfig, _samples, fit

log = logging.getLogger("lungseg.train.gate")

DEFAULT_BUDGET = 0.005  # of unaltered images flagged as mirrored: a quarter of the 2 % false-alarm goal


def threshold_for(scores: np.ndarray, budget: float) -> float:
    """The lowest probability flagging at most ``budget`` of ``scores`` (logits): just above the first
    score the budget does not allow."""
    ordered = np.sort(np.asarray(scores, np.float64))[::-1]
    allowed = math.floor(budget * len(ordered))
    if allowed >= len(ordered):
        return 0.0
    first_not_allowed = 1.0 / (1.0 + math.exp(-float(ordered[allowed])))
    return float(np.nextafter(first_not_allowed, 2.0))


def calibrate(run: Path, config: GateTrainConfig, folds: int = 3, budget: float = DEFAULT_BUDGET) -> dict[str, Any]:
    """Out-of-fold mirror threshold; written into ``run/gate.json`` under ``policy``."""
    import torch

    torch.set_num_threads(config.threads)
    split = gate_split(config.manifest, seed=0)
    train_set = _samples(run / "samples_train.npz", lambda: build_samples(
        split.train, find_nonchest(NONCHEST_TRAIN), seed=config.seed))
    parts = split_by_patient(split.train, tuple([1.0 / folds] * folds), seed=config.seed)
    good, mirrored, per_fold = [], [], []
    t0 = time.perf_counter()
    for index, part in enumerate(parts):
        held = {r.id for r in part}
        keep = np.array([b not in held for b in train_set.base_id])
        subset = GateSamples(x=train_set.x[keep], chest=train_set.chest[keep], negative=train_set.negative[keep],
                             base_id=[b for b, k in zip(train_set.base_id, keep, strict=True) if k])
        log.info("mirror calibration fold %d/%d: training on %d samples, scoring %d radiographs", index + 1,
                 folds, len(subset.chest), len(part))
        model, _ = fit(subset, replace(config, seed=config.seed + index))
        x = np.stack([gate_input_from_pixels(read_image(r.image).pixels) for r in part])
        def logits_of(batch: np.ndarray, model: Any = model) -> np.ndarray:
            return torch_logits(model, batch)

        fold_good = mirror_evidence(consensus_logits(logits_of, x))
        fold_mirrored = mirror_evidence(consensus_logits(logits_of, x[..., ::-1]))
        good.append(fold_good)
        mirrored.append(fold_mirrored)
        per_fold.append({"radiographs": len(part), "patients": len({r.patient_id for r in part})})
    good_all, mirrored_all = np.concatenate(good), np.concatenate(mirrored)
    np.savez(run / "mirror_oof_scores.npz", unaltered=good_all, mirrored=mirrored_all)
    threshold = threshold_for(good_all, budget)
    return record_policy(run, threshold, good_all, mirrored_all, {
        "folds": folds, "budget": budget, "per_fold": per_fold,
        "config": {**asdict(config), "manifest": Path(config.manifest).name},
        "seconds": round(time.perf_counter() - t0, 1)})


def record_policy(run: Path, threshold: float, unaltered: np.ndarray, mirrored: np.ndarray,
                  facts: dict[str, Any]) -> dict[str, Any]:
    """Write the threshold and what it flags (in probability, as the runtime compares) into ``gate.json``."""
    def flagged(logits: np.ndarray) -> float:
        return round(float(np.mean(1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64))) >= threshold)), 4)

    result = {
        "mirrored_threshold": threshold,
        "calibration": {
            "method": "out-of-fold scores of the training patients (lungseg.train.gate_calibrate)",
            **facts,
            "n_unaltered": len(unaltered),
            "oof_unaltered_flagged": flagged(unaltered),
            "oof_mirrored_flagged": flagged(mirrored),
        },
    }
    manifest_path = run / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest["policy"] = result
    atomic_write(manifest_path, json.dumps(manifest, indent=2) + "\n")  # it already holds the trained gate's record
    log.info("mirror threshold %.3f: %.2f %% of %d out-of-fold unaltered images flagged, %.1f %% of their mirror "
             "images", threshold, 100 * result["calibration"]["oof_unaltered_flagged"], len(unaltered),
             100 * result["calibration"]["oof_mirrored_flagged"])
    return result
