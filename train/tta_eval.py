"""Flip test-time augmentation, judged on the validation splits only (a model-v0.2 candidate).

The shipped model is run on each validation image as ``lungseg-segment`` runs it, without
the image gate (letterbox, ONNX Runtime, postprocessing at model resolution, guided
upscaling to native size) and,
for the candidate, also on the image's left-right mirror: the two probability maps (the
mirror's flipped back) are averaged before thresholding. Dice is taken at native size
against the reference mask, "ignore" pixels left out. The validation splits are those
the shipped model was chosen on (stage 1 and stage 2, repetition 0 of the data plan);
no test or independent image is read.

    python -m lungseg.train.tta_eval --data MANIFEST [--model BUNDLE] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.bundle import resolve_bundle
from lungseg.data import Record, load_manifest, read_label_mask
from lungseg.imaging import read_image
from lungseg.inference import segment_batch
from lungseg.predictors import OnnxRuntimePredictor
from lungseg.train.config import TrainConfig
from lungseg.train.holdout import dice
from lungseg.train.protocol import plan_data, stage_split

log = logging.getLogger(__name__)


class FlipAveraged:
    """A predictor that averages a model's probabilities on a batch and on its left-right mirror."""

    def __init__(self, predictor: Any):
        self.predictor = predictor

    def predict(self, batch: np.ndarray) -> np.ndarray:
        both = np.concatenate([batch, batch[..., ::-1]], axis=0)
        probabilities = self.predictor.predict(np.ascontiguousarray(both))
        n = len(batch)
        return (probabilities[:n] + probabilities[n:, :, ::-1]) / 2


def validation_records(manifest: Path, config: TrainConfig | None = None) -> dict[str, list[Record]]:
    """The stage-1 and stage-2 validation splits of repetition 0."""
    config = config or TrainConfig()
    plan = plan_data(load_manifest(manifest), config)
    return {"stage1_val": stage_split(plan.stage1, config, "stage1", 0)[1],
            "stage2_val": stage_split(plan.stage2, config, "stage2", 0)[1]}


def score(predictor: Any, records: list[Record]) -> dict[str, Any]:
    """Native-size Dice per image and the mean inference time per image (ms)."""
    values, infer_ms = [], []
    for record in records:
        radiograph = read_image(record.image)
        segmentation = segment_batch(predictor, [radiograph])[0]
        truth, valid = read_label_mask(record.mask)
        values.append(dice(segmentation.mask, truth, valid))
        infer_ms.append(segmentation.timings_ms["infer"])
    return {"n": len(values), "dice_mean": float(np.mean(values)), "dice_min": float(np.min(values)),
            "infer_ms_median": float(np.median(infer_ms)), "dice": values}


def evaluate(manifest: Path, model: Path | None = None, threads: int | None = None) -> dict[str, Any]:
    bundle = resolve_bundle(model)  # None: the shipped bundle
    base = OnnxRuntimePredictor(str(bundle.onnx), device="cpu", threads=threads)
    result: dict[str, Any] = {"model": str(bundle.onnx.name), "splits": {}}
    for split, records in validation_records(manifest).items():
        rows = {}
        for label, predictor in (("none", base), ("flip", FlipAveraged(base))):
            t0 = time.perf_counter()
            rows[label] = score(predictor, records)
            log.info("%s %s: Dice %.5f (%d images, %.0f s)", split, label, rows[label]["dice_mean"],
                     rows[label]["n"], time.perf_counter() - t0)
        gain = np.array(rows["flip"]["dice"]) - np.array(rows["none"]["dice"])
        rows["flip_minus_none"] = {"mean": float(gain.mean()), "better": int((gain > 0).sum()),
                                   "worse": int((gain < 0).sum())}
        result["splits"][split] = rows
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lungseg.train.tta_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="manifest CSV")
    parser.add_argument("--model", type=Path, default=None, help="bundle (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the per-image results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.data.is_file():
        log.error("%s: no such manifest", args.data)
        return 2
    result = evaluate(args.data, args.model, args.threads)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    summary = {split: {k: v.get("dice_mean", v) for k, v in rows.items()}
               for split, rows in result["splits"].items()}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
