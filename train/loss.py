"""Losses: smooth Dice (the donor's and the paper's) and Dice + BCE, with "ignore" pixels left out."""

from __future__ import annotations

import torch


def smooth_dice_loss(
    probabilities: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """``1 - (2|P∩T| + λ) / (|P| + |T| + λ)`` over the batch, counting only ``valid`` pixels."""
    p = probabilities.float() * valid
    t = target.float() * valid
    intersection = (p * t).sum()
    return 1.0 - (2.0 * intersection + smooth) / (p.sum() + t.sum() + smooth)


def dice_bce_loss(
    probabilities: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0,
    bce_weight: float = 1.0,
) -> torch.Tensor:
    """Smooth Dice + ``bce_weight`` x pixel-mean binary cross-entropy over ``valid`` pixels."""
    p = probabilities.float().clamp(1e-6, 1 - 1e-6)
    t, v = target.float(), valid.float()
    bce = torch.nn.functional.binary_cross_entropy(p, t, reduction="none")
    return smooth_dice_loss(p, t, v, smooth) + bce_weight * (bce * v).sum() / v.sum().clamp_min(1.0)


def stage_loss(name: str):
    """The loss function a config names."""
    if name == "dice":
        return lambda p, t, v, config: smooth_dice_loss(p, t, v, config.smooth)
    if name == "dice_bce":
        return lambda p, t, v, config: dice_bce_loss(p, t, v, config.smooth, config.bce_weight)
    raise ValueError(f"unknown loss {name!r} (dice, dice_bce)")
