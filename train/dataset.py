"""Radiographs and masks in model space, through the shared preprocessing path."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from lungseg.data import Record, read_label_mask
from lungseg.imaging import read_image
from lungseg.preprocess import CHANNELS, Geometry, letterbox, normalise
from lungseg.train.augment import intensity_augment

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One preprocessed training example (single channel; channels are repeated on the fly)."""

    record: Record
    image: np.ndarray  # (S, S) float32, normalised
    lung: np.ndarray  # (S, S) uint8 0/1
    valid: np.ndarray  # (S, S) uint8 0/1; 0 on the "ignore" label
    square: np.ndarray | None = None  # (S, S) float32 letterboxed [0, 1] image before normalisation
    geometry: Geometry | None = None


def sample_from_square(record: Record, square: np.ndarray, geometry: Geometry, lung: np.ndarray,
                       valid: np.ndarray) -> Sample:
    """A sample from a letterboxed image; normalised by the runtime's own :func:`normalise`."""
    return Sample(record=record, image=normalise(square, geometry), lung=lung, valid=valid,
                  square=square, geometry=geometry)


def load_sample(record: Record, size: int) -> Sample:
    """Read and preprocess one record exactly as inference does (``preprocess`` = letterbox + normalise)."""
    radiograph = read_image(record.image)
    square, geometry = letterbox(radiograph.pixels, size)
    lung, valid = read_label_mask(record.mask)
    if lung.shape != radiograph.shape:
        raise ValueError(f"{record.mask}: mask shape {lung.shape} != image shape {radiograph.shape}")
    return sample_from_square(record, square, geometry, geometry.to_model(lung.astype(np.uint8), nearest=True),
                              geometry.to_model(valid.astype(np.uint8), nearest=True, fill=1))


def load_samples(records: Sequence[Record], size: int, workers: int = 2) -> list[Sample]:
    """Preprocess records in parallel threads (OpenCV and NumPy release the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda r: load_sample(r, size), records))


def rotate(sample_arrays: tuple[np.ndarray, np.ndarray, np.ndarray], degrees: float):
    """Rotate image (linear, background fill), lung (nearest, 0) and valid (nearest, 1)."""
    image, lung, valid = sample_arrays
    size = image.shape[0]
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), degrees, 1.0)
    warp = lambda a, interp, fill: cv2.warpAffine(  # noqa: E731
        a, matrix, (size, size), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=fill
    )
    return (
        warp(image, cv2.INTER_LINEAR, float(image.min())),
        warp(lung, cv2.INTER_NEAREST, 0),
        warp(valid, cv2.INTER_NEAREST, 1),
    )


class SegmentationDataset(Dataset):
    """Model-space tensors with per-sample augmentation.

    The paper's augmentation is a rotation in ±degrees with probability p; the product
    protocol adds portable-image intensity faults (``intensity_probability``) applied
    before the shared normalisation. Random draws depend only on (seed, epoch, index),
    so loader worker processes and resumed runs see exactly the same augmentations.
    """

    def __init__(self, samples: Sequence[Sample], degrees: float = 0.0, probability: float = 0.0,
                 seed: int = 0, intensity_probability: float = 0.0, electrode_probability: float = 0.0):
        self.samples = list(samples)
        self.degrees = degrees
        self.probability = probability
        self.intensity_probability = intensity_probability
        self.electrode_probability = electrode_probability
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.samples[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = s.image
        if self.intensity_probability > 0 and rng.random() < self.intensity_probability:
            if s.square is None or s.geometry is None:
                raise ValueError(f"{s.record.id}: intensity augmentation needs the un-normalised image")
            square = s.square.copy()
            square[s.geometry.content] = intensity_augment(s.square[s.geometry.content], rng,
                                                           self.electrode_probability)
            image = normalise(square, s.geometry)
        arrays = (image, s.lung, s.valid)
        if self.degrees > 0 and rng.random() < self.probability:
            arrays = rotate(arrays, rng.uniform(-self.degrees, self.degrees))
        image, lung, valid = arrays
        x = torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0).expand(CHANNELS, -1, -1).clone()
        return x, torch.from_numpy(lung.astype(np.float32))[None], torch.from_numpy(
            valid.astype(np.float32)
        )[None]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
