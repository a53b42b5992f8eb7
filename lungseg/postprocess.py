"""Turn a probability map into a clean lung mask: threshold, two largest components, holes."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PostprocessConfig:
    """How a probability map becomes a mask."""

    threshold: float = 0.5
    keep_components: int = 2
    fill_holes: bool = True


def label_components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components of a binary mask: (count, labels, areas indexed by label-1)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return count - 1, labels, stats[1:, cv2.CC_STAT_AREA]


def keep_largest(mask: np.ndarray, n: int) -> np.ndarray:
    """Keep the ``n`` largest 8-connected components of a binary mask."""
    count, labels, areas = label_components(mask)
    if count <= n:
        return mask.astype(bool)
    keep = np.argsort(areas)[::-1][:n] + 1
    return np.isin(labels, keep)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the image border."""
    mask = mask.astype(bool)
    padded = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 2)
    holes = (flood == 1)[1:-1, 1:-1]
    return mask | holes


def postprocess(probabilities: np.ndarray, config: PostprocessConfig | None = None) -> np.ndarray:
    """Probability map -> boolean lung mask."""
    config = config or PostprocessConfig()
    mask = probabilities >= config.threshold
    if config.keep_components > 0:
        mask = keep_largest(mask, config.keep_components)
    if config.fill_holes:
        mask = fill_holes(mask)
    return mask


def artefacts(mask: np.ndarray) -> dict[str, bool | int]:
    """QA facts: component count, extra islands, lungs joined into one component."""
    count, _, _ = label_components(mask)
    return {
        "components": int(count),
        "islands": bool(count > 2),
        "lungs_joined": bool(count == 1),
        "artefact": bool(count != 2),
    }
