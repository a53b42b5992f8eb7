"""The chained steps: donor -> stage 1 -> stage 2 -> evaluation, each resumable."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from lungseg.data import Record, load_manifest
from lungseg.nn.checkpoint import load_checkpoint
from lungseg.nn.unet import UNet, load_donor
from lungseg.train.cache import is_cache, read_cache
from lungseg.train.config import TrainConfig
from lungseg.train.dataset import Sample, load_samples
from lungseg.train.evaluate import evaluate_model, write_evaluation
from lungseg.train.loop import BEST, DONE, train_stage
from lungseg.train.protocol import DataPlan, plan_data, stage2_parent, stage_split

log = logging.getLogger(__name__)
STEPS = ("stage1", "stage2", "evaluate")


class Run:
    """A run folder: resolved config, the data plan, the splits and cached samples."""

    def __init__(self, run_dir: Path, config: TrainConfig):
        self.dir = run_dir
        self.config = config
        self._cache: dict[str, Sample] = {}
        if is_cache(config.manifest):
            records, self._cache = read_cache(config.manifest)
        else:
            records = load_manifest(config.manifest)
        self.plan: DataPlan = plan_data(records, config)

    @classmethod
    def open(cls, run_dir: Path, config: TrainConfig | None = None) -> Run:
        """Open an existing run (its saved config wins) or start one with ``config``."""
        saved = run_dir / "config.json"
        if saved.is_file():
            stored = TrainConfig.load(saved)
            if config is not None:  # where and how fast may change between sessions, never what is trained
                stored.device, stored.workers, stored.loader_workers = (
                    config.device, config.workers, config.loader_workers)
            config = stored
        elif config is None:
            raise FileNotFoundError(f"{run_dir}: not a training run (no config.json)")
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(saved)
        run = cls(run_dir, config)
        (run_dir / "data_plan.json").write_text(json.dumps(run.plan.summary(), indent=2) + "\n")
        return run

    def samples(self, records: list[Record]) -> list[Sample]:
        missing = [r for r in records if r.id not in self._cache]
        if missing:
            t0 = time.perf_counter()
            for sample in load_samples(missing, self.config.image_size, self.config.workers):
                self._cache[sample.record.id] = sample
            log.info("preprocessed %d images in %.1f s", len(missing), time.perf_counter() - t0)
        return [self._cache[r.id] for r in records]

    def rep_dir(self, stage: str, rep: int) -> Path:
        return self.dir / stage / f"rep{rep:02d}"

    def splits(self, stage: str, rep: int) -> list[list[Record]]:
        pool = self.plan.stage1 if stage == "stage1" else self.plan.stage2
        parts = stage_split(pool, self.config, stage, rep)
        rep_dir = self.rep_dir(stage, rep)
        rep_dir.mkdir(parents=True, exist_ok=True)
        (rep_dir / "split.json").write_text(json.dumps(
            {name: [r.id for r in part] for name, part in zip(("train", "val", "test"), parts, strict=True)},
            indent=1) + "\n")
        return parts

    def n_reps(self, stage: str) -> int:
        return self.config.repetitions if stage == "stage1" else self.config.reps_stage2


def train_repetition(run: Run, stage: str, rep: int) -> None:
    """Train (or resume, or skip if finished) one repetition of one stage."""
    config = run.config
    train, val, _ = run.splits(stage, rep)
    seed = config.seed + (0 if stage == "stage1" else 1000) + rep
    torch.manual_seed(seed)  # before the model is built: a scratch initialisation is seeded too
    if stage == "stage1":
        model = load_donor(config.donor) if config.init_features == 32 else UNet(
            init_features=config.init_features)
    else:
        parent = run.rep_dir("stage1", stage2_parent(rep, config)) / BEST
        if not (parent.parent / DONE).is_file():
            raise RuntimeError(f"stage 2 needs the finished stage-1 model {parent}; run stage1 first")
        model = load_checkpoint(parent).model.train()
    result = train_stage(model, run.samples(train), run.samples(val), config,
                         run.rep_dir(stage, rep), stage, seed)
    log.info("%s rep %d: best val loss %.4f at epoch %d", stage, rep, result.best_val_loss,
             result.best_epoch)


def run_evaluation(run: Run) -> dict:
    """Score every finished repetition (test split + independent half) and save overlay examples."""
    rows: list[dict] = []
    independent = run.samples(run.plan.independent)
    examples: dict[str, np.ndarray] = {}
    for stage in ("stage1", "stage2"):
        for rep in range(run.n_reps(stage)):
            rep_dir = run.rep_dir(stage, rep)
            if not (rep_dir / DONE).is_file():
                log.warning("%s: not finished, left out of the evaluation", rep_dir)
                continue
            model = load_checkpoint(rep_dir / BEST).model
            if run.config.device != "cpu" and torch.cuda.is_available():
                model = model.cuda()  # fp32 on the GPU: same numbers as the CPU within rounding
            test = run.samples(run.splits(stage, rep)[2])
            extra = {"stage": stage, "rep": rep}
            test_rows, _ = evaluate_model(model, test, run.config.threshold, f"{stage} rep {rep} test",
                                          {**extra, "split": "test"})
            ind_rows, probs = evaluate_model(model, independent, run.config.threshold,
                                             f"{stage} rep {rep} independent", {**extra, "split": "independent"})
            rows += test_rows + ind_rows
            if rep == 0:
                examples[f"{stage}_probability"] = probs.astype(np.float16)
    out = run.dir / "evaluation"
    summary = write_evaluation(out, rows)
    if examples:
        np.savez_compressed(
            out / "independent_predictions.npz",
            ids=np.array([s.record.id for s in independent]),
            classes=np.array([s.record.image_class for s in independent]),
            images=np.stack([s.image for s in independent]).astype(np.float16),
            truth=np.stack([s.lung for s in independent]), **examples,
        )
    return summary


def best_checkpoint(run_dir: Path, stage: str = "stage2") -> Path:
    """The finished repetition of ``stage`` with the lowest validation loss (never chosen on test data)."""
    finished = sorted(run_dir.glob(f"{stage}/rep*/{DONE}"))
    if not finished:
        raise FileNotFoundError(f"{run_dir}: no finished {stage} repetition")
    best = min(finished, key=lambda p: json.loads(p.read_text())["best_val_loss"])
    return best.parent / BEST
