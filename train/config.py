"""Training configuration: the paper's protocol as defaults."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lungseg.errors import LungsegError


class TrainConfigError(LungsegError, ValueError):
    """A training configuration (``config.json``) that names a setting :class:`TrainConfig` does not have."""


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved as ``config.json`` in each run folder."""

    manifest: str = ""
    donor: str = "scratch"
    repetitions: int = 25
    stage2_repetitions: int | None = None
    max_epochs: int = 200
    stage2_max_epochs: int | None = None
    patience: int = 20
    batch_size: int = 16
    image_size: int = 256
    lr: float = 1e-3
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    smooth: float = 1.0
    rotation_degrees: float = 10.0
    rotation_probability: float = 0.75
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    portable_half_seed: int = 1234
    device: str = "auto"
    workers: int = 2
    threshold: float = 0.5
    init_features: int = 32
    protocol: str = "paper"
    loss: str = "dice"  # dice | dice_bce
    bce_weight: float = 1.0
    geometry: str = "sample"  # sample: the paper's per-image rotation | batch: rotation+scale+shift on device
    scale_range: float = 0.0
    translate_fraction: float = 0.0
    intensity_probability: float = 0.0
    electrode_probability: float = 0.0  # ECG electrodes, within the intensity faults (issue 24)
    stage2_lr: float | None = None
    stage2_freeze: str = "none"  # none | encoder
    loader_workers: int = 0

    @property
    def reps_stage2(self) -> int:
        return self.stage2_repetitions if self.stage2_repetitions is not None else self.repetitions

    def epochs_for(self, stage: str) -> int:
        if stage == "stage2" and self.stage2_max_epochs is not None:
            return self.stage2_max_epochs
        return self.max_epochs

    def lr_for(self, stage: str) -> float:
        return self.stage2_lr if stage == "stage2" and self.stage2_lr is not None else self.lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config of ``data``; an unknown key is an error (like the edge's config), never silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            raise TrainConfigError(f"unknown training setting{'s' if len(unknown) > 1 else ''} {names} "
                                   f"(known: {', '.join(sorted(known))})")
        values = dict(data)
        if "split_fractions" in values:
            values["split_fractions"] = tuple(values["split_fractions"])
        return cls(**values)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except TrainConfigError as exc:
            raise TrainConfigError(f"{path}: {exc}") from None


# Named protocols: "paper" is Vidal et al. (2021) as published; "product" is the recipe of the
# shipped model, chosen by validation Dice (see docs/training_report). Explicit flags win.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "paper": {},
    "product": {
        "loss": "dice_bce", "geometry": "batch", "rotation_degrees": 10.0, "rotation_probability": 0.8,
        "scale_range": 0.12, "translate_fraction": 0.06, "intensity_probability": 0.8,
        "max_epochs": 120, "stage2_max_epochs": 60, "stage2_lr": 3e-4,
    },
}
