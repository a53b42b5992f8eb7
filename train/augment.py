"""Augmentations of the product protocol: portable-image intensity faults and batch geometry.

*Intensity* (per sample, NumPy, on the letterboxed image **before** the shared
:func:`lungseg.preprocess.normalise`, so the model still sees exactly the runtime's
normalisation): gamma, low contrast with scatter haze, blur, quantum noise, thin
bright lines (tubes, leads, wires) and, when asked for, ECG electrodes (bright discs
with a lead). *Geometry* (per batch, torch, on the training device): rotation,
isotropic scale and translation, applied identically to image, lung mask and valid mask.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur (edge-replicated), NumPy only."""
    if radius < 1:
        return image
    k = 2 * radius + 1
    padded = np.pad(image, radius, mode="edge")
    c = np.cumsum(padded, axis=0, dtype=np.float64)
    c = np.concatenate([np.zeros((1, c.shape[1])), c])
    rows = (c[k:] - c[:-k]) / k
    c = np.cumsum(rows, axis=1)
    c = np.concatenate([np.zeros((c.shape[0], 1)), c], axis=1)
    return ((c[:, k:] - c[:, :-k]) / k).astype(np.float32)


def _draw_line(image: np.ndarray, rng: np.random.Generator, value: float) -> None:
    """A thin bright polyline (a tube or lead) across the content, drawn in place."""
    h, w = image.shape
    points = rng.uniform(0, 1, size=(3, 2)) * (h - 1, w - 1)
    width = int(rng.integers(1, 4))
    for (y0, x0), (y1, x1) in itertools.pairwise(points):
        n = int(max(abs(y1 - y0), abs(x1 - x0))) + 1
        ys = np.linspace(y0, y1, n).round().astype(int)
        xs = np.linspace(x0, x1, n).round().astype(int)
        for dy in range(width):
            image[np.clip(ys + dy, 0, h - 1), xs] = value


def _draw_electrode(image: np.ndarray, rng: np.random.Generator, value: float) -> None:
    """An ECG electrode: a bright disc (snap button, ~2-4 % of the width) with its lead wire, drawn in place."""
    h, w = image.shape
    radius = max(1.0, float(rng.uniform(0.01, 0.02)) * w)
    cy, cx = float(rng.uniform(0, h - 1)), float(rng.uniform(0, w - 1))
    yy, xx = np.ogrid[:h, :w]
    image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = value
    end = rng.uniform(0, 1, size=2) * (h - 1, w - 1)
    n = int(max(abs(end[0] - cy), abs(end[1] - cx))) + 1
    ys = np.linspace(cy, end[0], n).round().astype(int)
    xs = np.linspace(cx, end[1], n).round().astype(int)
    image[np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)] = value


def intensity_augment(content: np.ndarray, rng: np.random.Generator, electrodes: float = 0.0) -> np.ndarray:
    """Portable-unit look for a ``[0, 1]`` MONOCHROME2 content region (float32 in, float32 out).

    ``electrodes``: probability of 1-4 ECG electrodes on top; at 0 no random number is drawn for them, so the
    other faults stay exactly as they were.
    """
    x = np.clip(content.astype(np.float32, copy=True), 0.0, 1.0)
    if rng.random() < 0.5:  # exposure / detector response
        x = x ** np.float32(math.exp(rng.uniform(-0.5, 0.5)))
    if rng.random() < 0.5:  # scatter: a low-frequency haze that lowers contrast
        haze = _box_blur(x, max(1, x.shape[0] // 8))
        amount = np.float32(rng.uniform(0.1, 0.5))
        x = (1 - amount) * x + amount * haze + np.float32(rng.uniform(0.0, 0.15))
    if rng.random() < 0.3:  # soft focus / motion
        x = _box_blur(x, int(rng.integers(1, 3)))
    if rng.random() < 0.5:  # quantum noise
        x = x + rng.normal(0.0, rng.uniform(0.005, 0.04), size=x.shape).astype(np.float32)
    if rng.random() < 0.3:  # tubes, leads, wires: radio-opaque, so bright
        for _ in range(int(rng.integers(1, 4))):
            _draw_line(x, rng, float(rng.uniform(0.8, 1.0)))
    if electrodes > 0 and rng.random() < electrodes:  # monitoring leads on ICU / bedside films
        for _ in range(int(rng.integers(1, 5))):
            _draw_electrode(x, rng, float(rng.uniform(0.85, 1.0)))
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def random_affine(batch: int, degrees: float, scale: float, translate: float, probability: float,
                  generator: torch.Generator) -> torch.Tensor:
    """``(batch, 2, 3)`` affine matrices for :func:`torch.nn.functional.affine_grid` (identity with 1 - p)."""
    u = torch.rand((batch, 5), generator=generator)
    apply = (u[:, 0] < probability).float()
    angle = torch.deg2rad((u[:, 1] * 2 - 1) * degrees) * apply
    zoom = torch.exp((u[:, 2] * 2 - 1) * math.log1p(scale) * apply)
    tx = (u[:, 3] * 2 - 1) * translate * 2 * apply
    ty = (u[:, 4] * 2 - 1) * translate * 2 * apply
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def geometric_augment(x: torch.Tensor, lung: torch.Tensor, valid: torch.Tensor, theta: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warp a batch: image bilinear (filled with each image's background), masks nearest.

    Outside the warped content the lung mask is 0 and the valid mask is 1 (scored as background).
    """
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    fill = x.amin(dim=(1, 2, 3), keepdim=True)
    x = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    lung = F.grid_sample(lung, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    valid = 1 - F.grid_sample(1 - valid, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x, lung, valid
