"""Progress display for the benchmark's loops, on stderr: tqdm where it is installed, else one line per step.

tqdm comes with the ``[train]`` extra; a runtime-only install (an edge device) has none, and the
benchmark must run there too.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TextIO, TypeVar

try:  # optional extra ([train]): absent on a runtime-only install, where plain lines stand in for it
    from tqdm import tqdm
except ImportError:
    tqdm = None

T = TypeVar("T")


def plain(items: Sequence[T], desc: str, unit: str, stream: TextIO) -> Iterator[T]:
    """``desc: i/n unit`` on ``stream`` before each item (what stands in for tqdm)."""
    for index, item in enumerate(items, 1):
        stream.write(f"{desc}: {index}/{len(items)} {unit}\n")
        stream.flush()
        yield item


def track(items: Sequence[T], desc: str, unit: str, *, enabled: bool, stream: TextIO | None = None) -> Iterator[T]:
    """Iterate ``items``, showing progress on ``stream`` (stderr) when ``enabled``."""
    if not enabled:
        return iter(items)
    if tqdm is not None and stream is None:
        return iter(tqdm(items, desc=desc, unit=unit))
    return plain(items, desc, unit, stream or sys.stderr)
