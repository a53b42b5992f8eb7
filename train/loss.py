"""Smooth Dice loss (the donor's and the paper's), with "ignore" pixels left out."""

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
