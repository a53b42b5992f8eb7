"""File access of the edge runtime.

Writes are durable and atomic: temp name in the same folder, fsync, rename, fsync
the folder. Inputs are read without following links (:func:`read_input`): a link,
a FIFO, a device or anything whose real path leaves the watch folder is refused,
so nothing outside the watch folder is ever read or copied.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from pathlib import Path

from lungseg.atomic import TEMP_SUFFIX, atomic_write, fsync_dir, fsync_file, temp_name, write_synced
from lungseg.bundle import sha256_file

log = logging.getLogger("lungseg.edge")

# Faults of the output side (retried with backoff); any other error while writing outputs
# comes from the input and is the input's fault.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
                           errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT,
                           errno.ESTALE, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EXDEV})


class NotRegularFileError(OSError):
    """A link, FIFO, device, folder, or a path that leaves the watch folder: never read."""


class InputTooLargeError(OSError):
    """An input larger than the configured limit: never read into memory."""


def is_output_fault(exc: BaseException) -> bool:
    """True for real output faults (disk full, permission, read-only...), which are worth retrying.

    Libraries wrap them (pydicom: ``OSError("With tag ... got exception: [Errno 28] ...")`` without an
    errno), so the chain of causes is searched too.
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        if isinstance(current, OSError) and current.errno in OUTPUT_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def lstat_input(path: Path, root: Path) -> os.stat_result:
    """``lstat`` of an input, refusing links and anything not a regular file inside ``root``."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise NotRegularFileError(errno.ELOOP, "a symbolic link (not followed)")
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(errno.EINVAL, "not a regular file")
    real = os.path.realpath(path)
    if real != os.fspath(path) or not real.startswith(os.fspath(root).rstrip(os.sep) + os.sep):
        raise NotRegularFileError(errno.EXDEV, "reached through a linked folder (not followed)")
    return st


def read_input(path: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The whole content of a regular file, opened without following a link; and its ``fstat``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFileError(errno.ELOOP, "a symbolic link (not followed)") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file")
        if st.st_size > max_bytes:
            raise InputTooLargeError(errno.EFBIG, f"{st.st_size} bytes exceed the limit of {max_bytes}")
        chunks = []
        total = 0
        while block := os.read(fd, 1 << 20):
            chunks.append(block)
            total += len(block)
            if total > max_bytes:
                raise InputTooLargeError(errno.EFBIG, f"more than {max_bytes} bytes")
        return b"".join(chunks), st
    finally:
        os.close(fd)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-sized pieces (:func:`lungseg.bundle.sha256_file`)."""
    return sha256_file(path, chunk)


class StagedFiles:
    """Write several outputs to temp names, then publish them together.

    ``stage(final)`` returns the temp path to write to. ``publish()`` fsyncs each
    temp file, renames it to its final name and fsyncs the folders. ``discard()``
    (or leaving the ``with`` block by an exception) removes every temp file, so an
    interrupted write never leaves a partial output behind.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self._synced: set[Path] = set()

    def stage(self, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(final)
        self._staged.append((tmp, final))
        return tmp

    def write(self, final: Path, data: bytes | memoryview) -> Path:
        """Stage ``final`` and write ``data`` to its temp name in one call, fsynced on the same descriptor."""
        tmp = self.stage(final)
        write_synced(tmp, data)
        self._synced.add(tmp)
        return tmp

    def mark_synced(self, tmp: Path) -> None:
        """``tmp`` (from :meth:`stage`) was written and fsynced by its caller (:func:`write_synced`)."""
        self._synced.add(tmp)

    def publish(self) -> list[Path]:
        for tmp, _ in self._staged:
            if tmp not in self._synced:
                fsync_file(tmp)
        folders = set()
        for tmp, final in self._staged:
            os.replace(tmp, final)
            folders.add(final.parent)
        for folder in folders:
            fsync_dir(folder)
        published = [final for _, final in self._staged]
        self._staged, self._synced = [], set()
        return published

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._staged, self._synced = [], set()

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def atomic_write_bytes(final: Path, data: bytes) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(final, data)


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
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:  # e.g. a read-only folder: leave it (never a reason not to start)
            log.warning("cannot remove the stale temp file %s (%s)", path.name, exc.strerror or exc)
            continue
        removed += 1
    return removed

