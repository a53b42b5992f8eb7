"""Evaluate every repetition's best model on its test split and on the independent portable half."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lungseg.metrics import image_metrics, summarise, summarise_by
from lungseg.nn.unet import UNet
from lungseg.postprocess import PostprocessConfig, artefacts, postprocess
from lungseg.train.dataset import Sample

log = logging.getLogger(__name__)


def predict_samples(model: UNet, samples: Sequence[Sample], batch_size: int = 8) -> np.ndarray:
    """fp32 probabilities ``(N, S, S)`` for preprocessed samples (on the model's device)."""
    outputs = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            x = torch.from_numpy(np.stack([s.image for s in chunk]))[:, None].expand(-1, 3, -1, -1)
            outputs.append(model(x.contiguous().to(device))[:, 0].float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0,))


def score(samples: Sequence[Sample], probabilities: np.ndarray, threshold: float,
          extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-image metric rows (raw threshold) plus artefact facts before/after postprocessing."""
    rows = []
    post_config = PostprocessConfig(threshold=threshold)
    for sample, prob in zip(samples, probabilities, strict=True):
        metrics = image_metrics(prob, sample.lung.astype(bool), sample.valid.astype(bool), threshold)
        raw = artefacts(prob >= threshold)
        post_mask = postprocess(prob, post_config)
        post = artefacts(post_mask)
        post_dice = image_metrics(prob, sample.lung.astype(bool), sample.valid.astype(bool),
                                  prediction=post_mask)["DICE"]
        rows.append({
            "id": sample.record.id, "class": sample.record.image_class, **extra, **metrics,
            "DICE_post": post_dice,
            "artefact_raw": raw["artefact"], "artefact_post": post["artefact"],
            "components_raw": raw["components"], "components_post": post["components"],
        })
    return rows


def write_evaluation(out_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``rows.jsonl`` and ``metrics.json`` (the paper's Tables 1-4 as data)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "rows.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")

    def pick(**kw: Any) -> list[dict[str, Any]]:
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]

    def artefact_counts(subset: list[dict[str, Any]]) -> dict[str, int]:
        return {"images": len(subset), "raw": sum(r["artefact_raw"] for r in subset),
                "postprocessed": sum(r["artefact_post"] for r in subset)}

    summary = {
        "table1_stage1_test": summarise(pick(stage="stage1", split="test")),
        "table2_stage2_test": summarise(pick(stage="stage2", split="test")),
        "table3_stage1_independent_by_class": summarise_by(pick(stage="stage1", split="independent"), "class"),
        "table4_stage2_independent_by_class": summarise_by(pick(stage="stage2", split="independent"), "class"),
        "independent_overall": {
            "stage1": summarise(pick(stage="stage1", split="independent")),
            "stage2": summarise(pick(stage="stage2", split="independent")),
        },
        "artefacts_independent": {
            "stage1": artefact_counts(pick(stage="stage1", split="independent")),
            "stage2": artefact_counts(pick(stage="stage2", split="independent")),
        },
        "repetitions": {
            "stage1": len({r["rep"] for r in pick(stage="stage1")}),
            "stage2": len({r["rep"] for r in pick(stage="stage2")}),
        },
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate_model(model: UNet, samples: Sequence[Sample], threshold: float, desc: str,
                   extra: dict[str, Any]) -> tuple[list[dict[str, Any]], np.ndarray]:
    probabilities = predict_samples(model, list(tqdm(samples, desc=desc, leave=False, disable=None)))
    return score(samples, probabilities, threshold, extra), probabilities
