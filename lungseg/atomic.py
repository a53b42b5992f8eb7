"""Durable, atomic file replacement: the one way lungseg writes a file that others read.

The data goes to a hidden temp name in the target's folder (same filesystem, so the rename is
atomic), is fsynced, renamed over the target, and the folder is fsynced: a reader sees the old
file or the new one, never a part, and after a power cut the new one is there or the old one
is. Temp names are hidden and end in :data:`TEMP_SUFFIX`; the edge's stale-temp cleanup removes
those a killed process left behind.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

TEMP_SUFFIX = ".lungseg-tmp"


def temp_name(final: Path) -> Path:
    """A hidden temp name beside ``final``, unique per process and thread."""
    return final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}")


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


def write_synced(path: Path, data: bytes | bytearray | memoryview, mode: int = 0o666) -> None:
    """Create (or truncate) ``path`` without following a link, write ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _replace(path: Path, fill: Callable[[int], None], mode: int) -> Path:
    """Create a temp file beside ``path`` (never following a link), ``fill(fd)`` it, fsync, rename it over
    ``path``, fsync the folder; the temp file is removed if anything fails."""
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        try:
            fill(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def atomic_write(path: str | Path, data: bytes | str, *, mode: int = 0o666) -> Path:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8), durably and atomically.

    ``mode`` is the new file's permission before the umask (``0o600`` for secrets).
    """
    payload = data.encode() if isinstance(data, str) else data
    return _replace(Path(path), lambda fd: _write_all(fd, payload), mode)


def atomic_copy_file(source: str | Path, path: str | Path, *, mode: int = 0o666, block: int = 1 << 20) -> Path:
    """Replace ``path`` with a copy of the file ``source`` (streamed in ``block``-sized pieces: never all in
    memory), durably and atomically, as :func:`atomic_write`."""
    def fill(fd: int) -> None:
        with open(source, "rb") as src:
            for chunk in iter(lambda: src.read(block), b""):
                _write_all(fd, chunk)

    return _replace(Path(path), fill, mode)
