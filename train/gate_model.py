"""The image gate network: a small CNN with four heads in one logit vector (see ``lungseg.gate.HEADS``)."""

from __future__ import annotations

import torch
from torch import nn

from lungseg.gate import N_LOGITS


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class GateNet(nn.Module):
    """128x128 single-channel input -> 10 logits: orientation (4), negative (2), mirrored (2), chest (2).

    Five stride-2 stages (16-24-32-48-64 channels) keep a coarse 4x4 spatial map, flattened so
    the heads can see where things are (the heart's side, the diaphragm's height).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 24, 32, 48, 64), hidden: int = 96, dropout: float = 0.2):
        super().__init__()
        layers, cin = [], 1
        for width in widths:
            layers.append(_block(cin, width))
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin * 16, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, N_LOGITS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.adaptive_avg_pool2d(self.features(x), 4))
