"""Decode untrusted files in a separate, resource-limited worker process.

A malformed file can make a native decoder panic (``pyo3_runtime.PanicException``
derives from ``BaseException``), crash, loop or allocate without bound. Decoding
therefore runs in one persistent worker process (spawned, not forked) with an
address-space limit (``RLIMIT_AS``) and a per-file timeout; the daemon only ever
sees a decoded :class:`~lungseg.imaging.Radiograph` or a :class:`DecodeFailure`:

``decoder_crash``    the worker died (a signal other than our own kill)
``decoder_timeout``  no answer within the timeout: the worker is killed
``decoder_oom``      the worker ran out of its memory limit (``MemoryError``, a library that
                     could not be mapped, or a SIGKILL we did not send: the OOM killer)
``decode_error``     any other exception, with its type name only

plus the reason codes of :mod:`lungseg.dicom_decode`. File bytes go to the worker, and the
decoded pixels come back, through two shared-memory buffers (Linux ``memfd``, handed over
once at start) instead of the pipe: a 2,000-pixel uncompressed radiograph is 7 MB one way
and a few MB back, which through a socket cost about as much as decoding it. Files or
images larger than the buffers, and systems without ``memfd``, use the pipe. The daemon
never reads the input buffer back (it keeps its own copy of the file) and checks the shape
of what the output buffer holds. A dead or killed worker is
respawned for the next file, so one poison file costs one respawn, not the batch.
The worker limits its libraries to one thread before any of them loads
(:mod:`~lungseg.edge_runtime.worker_entry`, its import-free entry point), then loads every
decoder library before it takes input and before its limit is set
(:func:`lungseg.pixel_render.warm_up_decoders`). It ignores SIGINT/SIGTERM (the daemon
decides when to stop) and dies with its parent. Its logging and warnings are silenced:
library messages can quote patient data.

This module is the daemon's side (:class:`DecodeWorker`); the worker's side, and decoding in
this process, is :mod:`~lungseg.edge_runtime.decoding` (:class:`DecodeFailure`,
:func:`decode_in_process`, :func:`prepare_worker` are imported from there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import asdict
from typing import Any

import numpy as np

from lungseg.dicom_decode import DEFAULT_LIMITS, DecodeLimits
from lungseg.edge_runtime import worker_entry
from lungseg.edge_runtime.codes import QuarantineReason
from lungseg.edge_runtime.decoding import (
    DecodeFailure,
    decode_in_process,
    display_offset,
    keep_freed_memory,
    prepare_worker,
)
from lungseg.errors import LungsegError
from lungseg.imaging import Radiograph

log = logging.getLogger("lungseg.edge")

STARTUP_TIMEOUT_SECONDS = 120.0
INPUT_BUFFER_BYTES = 32 << 20  # a 4,000 x 4,000 16-bit uncompressed file
OUTPUT_BUFFER_BYTES = 24 << 20  # a 4,000 x 4,000 8-bit display image plus its reduced float32 pixels


class WorkerUnavailableError(LungsegError, RuntimeError):
    """The decode worker could not be started (not the input's fault)."""


class SharedBuffers:
    """The input and output buffers shared with the worker (``None`` where ``memfd`` is missing)."""

    def __init__(self, input_bytes: int = INPUT_BUFFER_BYTES, output_bytes: int = OUTPUT_BUFFER_BYTES):
        import mmap

        self.fds: list[int] = []
        self.maps: list[mmap.mmap] = []
        for name, size in (("lungseg-decode-in", input_bytes), ("lungseg-decode-out", output_bytes)):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            self.fds.append(fd)
            self.maps.append(mmap.mmap(fd, size))

    @classmethod
    def create(cls, input_bytes: int = INPUT_BUFFER_BYTES, output_bytes: int = OUTPUT_BUFFER_BYTES,
               ) -> SharedBuffers | None:
        if not hasattr(os, "memfd_create") or input_bytes <= 0 or output_bytes <= 0:
            return None
        try:
            return cls(input_bytes, output_bytes)
        except OSError as exc:
            log.info("shared decode buffers unavailable (%s); using the pipe", exc)
            return None

    @property
    def input(self) -> Any:
        return self.maps[0]

    @property
    def output(self) -> Any:
        return self.maps[1]

    def close(self) -> None:
        for buffer in self.maps:
            with contextlib.suppress(Exception):
                buffer.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.maps, self.fds = [], []


class DecodeWorker:
    """One persistent decode process, respawned after a crash, kill or timeout."""

    def __init__(self, limits: DecodeLimits = DEFAULT_LIMITS, memory_bytes: int = 2 << 30,
                 timeout_seconds: float = 60.0,
                 buffer_bytes: tuple[int, int] = (INPUT_BUFFER_BYTES, OUTPUT_BUFFER_BYTES)):
        """``buffer_bytes``: sizes of the shared input and output buffers ((0, 0): the pipe only)."""
        self.limits = limits
        self.buffer_bytes = buffer_bytes
        self.memory_bytes = int(memory_bytes)
        self.timeout_seconds = float(timeout_seconds)
        self.respawns = 0
        self._proc: Any = None
        self._conn: Any = None
        self._ready = False
        self._buffers: SharedBuffers | None = None

    # --- life cycle ---------------------------------------------------------------
    def start(self) -> DecodeWorker:
        """Spawn the worker (it warms up in the background; the first decode waits for it)."""
        import multiprocessing

        if self._proc is not None:
            return self
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=worker_entry.main, args=(child, self.memory_bytes, asdict(self.limits)),
                           daemon=True, name="lungseg-decode")
        proc.start()
        child.close()
        self._proc, self._conn, self._ready = proc, parent, False
        self._share_buffers()
        return self

    def _share_buffers(self) -> None:
        """Give a newly started worker fresh shared buffers (an old worker may still map the last ones)."""
        from multiprocessing.reduction import send_handle

        if self._buffers is not None:
            self._buffers.close()
        self._buffers = SharedBuffers.create(*self.buffer_bytes)
        try:
            if self._buffers is None:
                self._conn.send(("no buffers",))
                return
            self._conn.send(("buffers",))
            for fd in self._buffers.fds:
                send_handle(self._conn, fd, self._proc.pid)
        except (OSError, EOFError, ValueError):  # the worker died at once: the first decode will say so
            log.debug("could not hand the shared buffers to the decode worker", exc_info=True)

    def _wait_ready(self) -> None:
        if self._ready:
            return
        if not self._conn.poll(STARTUP_TIMEOUT_SECONDS):
            self._discard()
            raise WorkerUnavailableError("the decode worker did not start in time")
        try:
            message = self._conn.recv()
        except (EOFError, OSError) as exc:
            code = self._discard()
            raise WorkerUnavailableError(f"the decode worker exited at start-up (exit code {code})") from exc
        if message != ("ready",):
            self._discard()
            raise WorkerUnavailableError("the decode worker answered nonsense at start-up")
        self._ready = True

    def _discard(self, kill: bool = True) -> int | None:
        """Kill (if still alive) and reap the worker; returns its exit code."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        self._ready = False
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        if proc is None:
            return None
        if kill and proc.is_alive():
            with contextlib.suppress(Exception):
                proc.kill()
        proc.join(timeout=10)
        return proc.exitcode

    def close(self) -> None:
        self._discard()
        if self._buffers is not None:
            self._buffers.close()
            self._buffers = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # --- work ---------------------------------------------------------------------
    def decode(self, data: bytes, ref: str, min_side: int = 0, display: bool = False) -> Radiograph | DecodeFailure:
        """A Radiograph, or a :class:`DecodeFailure`. Raises :class:`WorkerUnavailableError` when no worker runs.

        ``display``: the radiograph also carries its full-resolution 8-bit image (for the overlay)."""
        self.start()
        self._wait_ready()
        buffers = self._buffers
        shared = buffers is not None and len(data) <= len(buffers.input)
        try:
            if shared and buffers is not None:
                buffers.input[:len(data)] = data
                self._conn.send((ref, min_side, display, len(data)))
            else:
                self._conn.send((ref, min_side, display, -1))
                self._conn.send_bytes(data)  # no pickled copy of the file
        except (OSError, EOFError, ValueError):
            return self._died()
        if not self._conn.poll(self.timeout_seconds):
            return self._replaced(QuarantineReason.DECODER_TIMEOUT,
                                  f"no result within {self.timeout_seconds:g} s; decoder killed")
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            return self._died()
        except Exception as exc:  # an answer that cannot be unpickled: treat like a crash
            return self._replaced(QuarantineReason.DECODER_CRASH,
                                  f"unreadable answer from the decoder ({type(exc).__name__})")
        if message[0] == "ok":
            radiograph, decode_ms, shape, display_shape = message[1], message[2], message[3], message[4]
            if shape is not None:
                radiograph.pixels = self._pixels_from_buffer(shape)
                if radiograph.pixels is None:
                    return self._replaced(QuarantineReason.DECODER_CRASH,
                                          "the decoder answered an impossible image size")
            if display_shape is not None:
                radiograph.display = self._display_from_buffer(display_shape, radiograph.pixels.nbytes)
                if radiograph.display is None:
                    return self._replaced(QuarantineReason.DECODER_CRASH,
                                          "the decoder answered an impossible display size")
            radiograph.facts["decode_ms_worker"] = round(decode_ms, 2)
            return radiograph
        return message[1]

    def _pixels_from_buffer(self, shape: Any) -> Any:
        """A copy of the float32 image the worker left in the output buffer, or ``None`` for a bad shape."""
        output = self._buffers.output if self._buffers is not None else None
        try:
            rows, columns = (int(n) for n in shape)
        except (TypeError, ValueError):
            return None
        if output is None or rows <= 0 or columns <= 0 or rows * columns * 4 > len(output):
            return None
        return np.frombuffer(output, dtype=np.float32, count=rows * columns).reshape(rows, columns).copy()

    def _display_from_buffer(self, shape: Any, pixels_nbytes: int) -> Any:
        """A copy of the uint8 display image behind the pixels in the output buffer, or ``None`` for a bad shape."""
        output = self._buffers.output if self._buffers is not None else None
        try:
            rows, columns = (int(n) for n in shape)
        except (TypeError, ValueError):
            return None
        start = display_offset(pixels_nbytes)
        if output is None or rows <= 0 or columns <= 0 or start + rows * columns > len(output):
            return None
        return np.frombuffer(output, dtype=np.uint8, count=rows * columns, offset=start).reshape(rows, columns).copy()

    def _replaced(self, code: str, reason: str) -> DecodeFailure:
        """Kill the worker (it hangs or answered nonsense), start a fresh one, and say why."""
        self._discard()
        self.respawns += 1
        self.start()
        return DecodeFailure(code, reason)

    def _died(self) -> DecodeFailure:
        if self._proc is not None:
            self._proc.join(timeout=5)  # it is dying: read its exit status before any kill of ours
        code = self._discard()
        self.respawns += 1
        self.start()
        if code == -signal.SIGKILL:
            return DecodeFailure(QuarantineReason.DECODER_OOM, "the decoder was killed (out of memory)")
        what = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return DecodeFailure(QuarantineReason.DECODER_CRASH, f"the decoder died ({what})")


__all__ = ["DecodeFailure", "DecodeWorker", "SharedBuffers", "WorkerUnavailableError", "decode_in_process",
           "keep_freed_memory", "prepare_worker"]
