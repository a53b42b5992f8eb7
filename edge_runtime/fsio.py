"""Durable, atomic file writes: temp name in the same folder, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

TEMP_SUFFIX = ".lungseg-tmp"


def temp_name(final: Path) -> Path:
    """A hidden temp name beside ``final`` (same filesystem, so the rename is atomic)."""
    return final.with_name(f".{final.name}.{os.getpid()}{TEMP_SUFFIX}")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class StagedFiles:
    """Write several outputs to temp names, then publish them together.

    ``stage(final)`` returns the temp path to write to. ``publish()`` fsyncs each
    temp file, renames it to its final name and fsyncs the folders. ``discard()``
    (or leaving the ``with`` block by an exception) removes every temp file, so an
    interrupted write never leaves a partial output behind.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def stage(self, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(final)
        self._staged.append((tmp, final))
        return tmp

    def publish(self) -> list[Path]:
        for tmp, _ in self._staged:
            fsync_file(tmp)
        folders = set()
        for tmp, final in self._staged:
            os.replace(tmp, final)
            folders.add(final.parent)
        for folder in folders:
            fsync_dir(folder)
        published = [final for _, final in self._staged]
        self._staged = []
        return published

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._staged = []

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def atomic_write_bytes(final: Path, data: bytes) -> Path:
    with StagedFiles() as staged:
        tmp = staged.stage(final)
        tmp.write_bytes(data)
        return staged.publish()[0]


def atomic_copy(src: Path, final: Path) -> Path:
    with StagedFiles() as staged:
        tmp = staged.stage(final)
        shutil.copyfile(src, tmp)
        return staged.publish()[0]


def remove_stale_temps(root: Path) -> int:
    """Delete temp files a killed process left under ``root``; returns how many."""
    removed = 0
    if not root.is_dir():
        return 0
    for path in root.rglob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed

