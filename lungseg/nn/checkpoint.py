"""Training checkpoints: load them into a :class:`~lungseg.nn.unet.UNet`, and the PyTorch predictor.

A checkpoint is what ``lungseg.train`` writes with ``torch.save``::

    {"model": state_dict, "config": {"init_features": 32, ...}, "stage": "stage2",
     "epoch": int, "val_loss": float, "model_name": "lungseg-unet", "model_version": "..."}

A bare state dict is accepted too. ``init_features`` comes from the config, else
from the shape of ``encoder1.enc1conv1.weight``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungseg.bundle import default_bundle_dir, sha256_file
from lungseg.nn.unet import UNet

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
DEFAULT_MODEL_NAME = "lungseg-unet"
FIRST_CONV = "encoder1.enc1conv1.weight"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not a lungseg U-Net; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model in eval mode and what is known about it."""

    path: Path
    sha256: str
    model: UNet
    init_features: int
    model_name: str = DEFAULT_MODEL_NAME
    model_version: str = "unknown"
    info: dict[str, Any] = field(default_factory=dict)


def default_checkpoint() -> Path:
    """Where the shipped model's checkpoint lives: ``<package>/models/default/checkpoint.pt``."""
    return default_bundle_dir() / CHECKPOINT_NAME


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a training checkpoint or bare state dict; :class:`CheckpointError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    info: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        info = {k: v for k, v in obj.items() if k != "model"}
        obj = obj["model"]
    if not isinstance(obj, dict) or FIRST_CONV not in obj:
        raise CheckpointError(f"{path}: not a lungseg U-Net checkpoint (no {FIRST_CONV!r} weights)")
    config = info["config"] if isinstance(info, dict) and isinstance(info.get("config"), dict) else {}
    init_features = int(config.get("init_features") or obj[FIRST_CONV].shape[0])
    model = UNet(init_features=init_features)
    try:
        model.load_state_dict(obj, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit UNet(init_features={init_features}): {exc}") from exc
    model.eval()
    return Checkpoint(
        path=path,
        sha256=sha256_file(path),
        model=model,
        init_features=init_features,
        model_name=str(info.get("model_name") or DEFAULT_MODEL_NAME),
        model_version=str(info.get("model_version") or "unknown"),
        info={k: info[k] for k in ("stage", "epoch", "val_loss") if k in info},
    )


def save_checkpoint(model: UNet, path: str | Path, **fields: Any) -> Path:
    """Write ``model`` in the training-checkpoint format (``config.init_features`` filled in)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dict(fields.pop("config", {}))
    config.setdefault("init_features", int(model.state_dict()[FIRST_CONV].shape[0]))
    payload = {"model": model.state_dict(), "config": config, "model_name": DEFAULT_MODEL_NAME, **fields}
    torch.save(payload, path)
    return path


def random_checkpoint(path: str | Path, *, init_features: int = 4, seed: int = 0,
                      centre_on: np.ndarray | None = None) -> Path:
    """An untrained checkpoint for smoke tests of the export and benchmark pipelines.

    With ``centre_on`` (a model-input batch) the final 1x1 convolution is rescaled so
    the logits over that batch have median 0 and quartiles at +-2: the masks are then
    large and most pixels are far from the threshold, like a trained model's.
    """
    torch.manual_seed(seed)
    model = UNet(init_features=init_features).eval()
    if centre_on is not None:
        with torch.no_grad():
            weight, bias = model.conv.weight, model.conv.bias
            assert bias is not None  # the final 1x1 convolution has a bias
            weight.normal_()
            bias.zero_()
            logits = torch.logit(model(torch.from_numpy(centre_on)), eps=1e-6).flatten()[::97]
            q25, q50, q75 = torch.quantile(logits, torch.tensor([0.25, 0.5, 0.75])).tolist()
            scale = 4.0 / max(q75 - q25, 1e-6)  # logits are linear in the 1x1 conv weights
            weight.mul_(scale)
            bias.fill_(-q50 * scale)
    return save_checkpoint(model, path, stage="untrained", epoch=0, model_version=f"random-seed{seed}")


class TorchPredictor:
    """PyTorch eager inference on the CPU (the parity reference); same interface as the others."""

    backend = "pytorch"
    precision = "fp32"

    def __init__(self, checkpoint: Checkpoint, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model = checkpoint.model.eval()
        self.model_path = str(checkpoint.path)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        return out[:, 0].numpy().astype(np.float32, copy=False)
