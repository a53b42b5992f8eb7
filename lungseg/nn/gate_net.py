"""The image gate network: a small CNN with four heads in one logit vector (see ``lungseg.gate.HEADS``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from lungseg.gate import N_LOGITS

GATE_VERSION = "0.3.0"  # 0.3.0: + hard good chests (white-out, small patient) as positives; 0.2.0: 30 epochs,
# flip-consensus mirror score, out-of-fold mirror threshold


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


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The gate's logits for a float batch ``(N, 1, S, S)``, without gradients."""
    with torch.no_grad():
        return model(torch.from_numpy(x.astype(np.float32))).numpy()


def load_gate_checkpoint(path: str | Path) -> GateNet:
    """A trained gate from its checkpoint (``gate.pt``), in eval mode."""
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    model = GateNet()
    model.load_state_dict(data["state_dict"])
    return model.eval()
