"""A portable samples cache: the whole data set in model space, in one ``.npz`` file.

Training on another machine (a GPU node, a Ray worker) then needs neither the original
images nor the image codecs. The cache holds what :func:`lungseg.train.dataset.load_sample`
computes before normalisation: the letterboxed image (uint16, within 1/65535 of the float
image; or uint8, within 1/510, half the size, enough for 8-bit source PNGs), its
:class:`~lungseg.preprocess.Geometry`, and the labels; normalisation
runs at load time through the shared :func:`lungseg.preprocess.normalise`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lungseg.data import Record
from lungseg.preprocess import Geometry
from lungseg.train.dataset import Sample, load_samples, sample_from_square

log = logging.getLogger(__name__)

CACHE_SCHEMA = "lungseg-train/samples/1"
_DTYPES = {8: np.uint8, 16: np.uint16}


def is_cache(path: str | Path) -> bool:
    return str(path).endswith(".npz")


def write_cache(records: Sequence[Record], path: Path, size: int, workers: int = 2, bits: int = 16) -> Path:
    """Preprocess ``records`` and write them to ``path`` (compressed ``.npz``, images of ``bits`` 8 or 16)."""
    if bits not in _DTYPES:
        raise ValueError(f"bits must be 8 or 16, not {bits}")
    samples = load_samples(records, size, workers)
    scale = float(2**bits - 1)
    squares = np.stack([np.round(np.clip(s.square, 0, 1) * scale) for s in samples]).astype(_DTYPES[bits])
    # labels: 0 background, 1 lung, 2 "ignore" (not valid)
    labels = np.stack([s.lung.astype(np.uint8) + 2 * (1 - s.valid.astype(np.uint8)) for s in samples])
    meta = {
        "schema": CACHE_SCHEMA, "size": size,
        "records": [{**asdict(s.record), "image": s.record.image.name, "mask": s.record.mask.name}
                    for s in samples],
        "geometries": [s.geometry.to_dict() for s in samples],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, squares=squares, labels=labels, meta=np.array(json.dumps(meta)))
    return path


def read_cache(path: str | Path) -> tuple[list[Record], dict[str, Sample]]:
    """Records (in file order) and their samples, normalised exactly as at run time."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: samples cache not found")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        if meta.get("schema") != CACHE_SCHEMA:
            raise ValueError(f"{path}: not a lungseg samples cache (schema {meta.get('schema')!r})")
        squares, labels = data["squares"], data["labels"]
    scale = np.float32(np.iinfo(squares.dtype).max)
    records, samples = [], {}
    for i, (row, geo) in enumerate(zip(meta["records"], meta["geometries"], strict=True)):
        record = Record(**{**row, "image": path.parent / row["image"], "mask": path.parent / row["mask"]})
        records.append(record)
        square = squares[i].astype(np.float32) / scale
        lung = (labels[i] == 1).astype(np.uint8)
        valid = (labels[i] != 2).astype(np.uint8)
        samples[record.id] = sample_from_square(record, square, Geometry(**geo), lung, valid)
    log.info("%s: %d cached samples (%d px)", path.name, len(records), meta["size"])
    return records, samples
