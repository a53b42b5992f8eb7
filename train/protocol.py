"""How the shared data set maps onto the paper's two stages, and the per-repetition splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lungseg.data import Record, split_by_patient
from lungseg.train.config import TrainConfig

STAGE1_SEED_OFFSET = 0
STAGE2_SEED_OFFSET = 1000


@dataclass(frozen=True)
class DataPlan:
    """Stage-1 pool (common chest X-rays), stage-2 pool and the independent portable half."""

    stage1: list[Record]
    stage2: list[Record]
    independent: list[Record]

    def summary(self) -> dict[str, int]:
        return {
            "stage1_images": len(self.stage1),
            "stage1_patients": len({r.patient_id for r in self.stage1}),
            "stage2_images": len(self.stage2),
            "stage2_patients": len({r.patient_id for r in self.stage2}),
            "independent_images": len(self.independent),
            "independent_patients": len({r.patient_id for r in self.independent}),
        }


def plan_data(records: Sequence[Record], config: TrainConfig) -> DataPlan:
    """Map a manifest onto the paper's protocol.

    Portable images are split by patient into two halves: stage-2 training (itself
    split 60/20/20 per repetition) and the independent half, never trained on.
    Stage 1 takes the non-portable images of patients with no portable image, so no
    patient is seen in stage 1 and then tested in stage 2 or the independent half.
    """
    portable = [r for r in records if r.portable]
    if not portable:
        raise ValueError("the manifest has no portable images (column portable == true)")
    stage2, independent = split_by_patient(portable, (0.5, 0.5), seed=config.portable_half_seed)
    portable_patients = {r.patient_id for r in portable}
    stage1 = [r for r in records if not r.portable and r.patient_id not in portable_patients]
    if not stage1:
        raise ValueError("the manifest has no non-portable images for stage 1")
    return DataPlan(stage1=stage1, stage2=stage2, independent=independent)


def stage_split(pool: Sequence[Record], config: TrainConfig, stage: str, repetition: int) -> list[list[Record]]:
    """Train/validation/test split of a stage's pool for one repetition (its own seed)."""
    offset = STAGE1_SEED_OFFSET if stage == "stage1" else STAGE2_SEED_OFFSET
    return split_by_patient(pool, config.split_fractions, seed=config.seed + offset + repetition)


def stage2_parent(repetition: int, config: TrainConfig) -> int:
    """The stage-1 repetition whose best model a stage-2 repetition starts from."""
    return repetition % config.repetitions
