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
The worker loads every decoder library before it takes input and before its limit is set
(:func:`lungseg.pixel_render.warm_up_decoders`). It ignores SIGINT/SIGTERM (the daemon
decides when to stop) and dies with its parent. Its logging and warnings are silenced:
library messages can quote patient data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lungseg.dicom_decode import DEFAULT_LIMITS, DecodeLimits

log = logging.getLogger("lungseg.edge")

STARTUP_TIMEOUT_SECONDS = 120.0
INPUT_BUFFER_BYTES = 32 << 20  # a 4,000 x 4,000 16-bit uncompressed file
OUTPUT_BUFFER_BYTES = 16 << 20  # 4 M float32 pixels
_PASSTHROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)


@dataclass(frozen=True)
class DecodeFailure:
    """Why a file could not be decoded; ``transient`` failures are retried, the rest quarantined."""

    code: str
    reason: str
    transient: bool = False


class WorkerUnavailableError(RuntimeError):
    """The decode worker could not be started (not the input's fault)."""


def decode_in_process(data: bytes, ref: str, limits: DecodeLimits = DEFAULT_LIMITS, min_side: int = 0) -> Any:
    """Decode ``data`` here; returns a Radiograph or a :class:`DecodeFailure` (never raises for bad input)."""
    from lungseg.dicom_decode import read_dicom
    from lungseg.imaging import UnreadableImageError

    try:
        return read_dicom(ref, data=data, limits=limits, min_side=min_side)
    except UnreadableImageError as exc:
        if _caused_by(exc, MemoryError):  # wrapped by pydicom / read_dicom
            return DecodeFailure("decoder_oom", "decoding ran out of memory (the image is too large for the limit)")
        return DecodeFailure(getattr(exc, "code", None) or "unreadable", exc.reason)
    except MemoryError:
        return DecodeFailure("decoder_oom", "decoding ran out of memory")
    except _PASSTHROUGH:
        raise
    except BaseException as exc:  # native extensions raise BaseException subclasses (pyo3 panics)
        if _out_of_address_space(exc):
            return DecodeFailure("decoder_oom", "decoding ran out of memory (a library could not be mapped)")
        return DecodeFailure("decode_error", f"decoder failed ({type(exc).__name__})")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it (``__cause__``, else ``__context__``), at most ten deep."""
    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            return
        yield current
        current = current.__cause__ or current.__context__


def _out_of_address_space(exc: BaseException) -> bool:
    """An import that failed because the memory limit left no room to map its shared library."""
    return any(isinstance(e, (ImportError, OSError)) and any(
        text in str(e) for text in ("failed to map segment", "Cannot allocate memory")) for e in _chain(exc))


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(e, kind) for e in _chain(exc))


def _strip(radiograph: Any) -> Any:
    """Drop what the daemon does not need (the encoded pixels, the file buffer) before sending it back."""
    ds = radiograph.dataset
    if ds is not None:
        with contextlib.suppress(Exception):
            del ds.PixelData
        for name in ("buffer", "filename", "fileobj_type"):
            with contextlib.suppress(Exception):
                setattr(ds, name, None)
        with contextlib.suppress(Exception):
            ds._pixel_array = None
    return radiograph


def _limit_memory(memory_bytes: int) -> None:
    import resource

    if memory_bytes <= 0:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc reuse freed large blocks instead of unmapping them (a no-op elsewhere).

    Every file allocates and frees a few buffers of the same sizes (file bytes, pixel arrays);
    glibc maps each block above 128 KiB afresh, and a fresh mapping costs a page fault per
    4 KiB touched: several milliseconds per radiograph. Blocks below ``mmap_threshold`` come
    from the heap instead, and up to ``trim_threshold`` of freed heap stays mapped for reuse.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, int(mmap_threshold))) and bool(mallopt(-1, int(trim_threshold)))  # M_MMAP/M_TRIM_THRESHOLD


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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


def _attach(conn: Any) -> tuple[Any, Any] | None:  # pragma: no cover - runs in the worker
    """The worker's view of the shared buffers, if the daemon sends them."""
    import mmap
    from multiprocessing.reduction import recv_handle

    if conn.recv() != ("buffers",):
        return None
    maps = []
    for prot in (mmap.PROT_READ, mmap.PROT_READ | mmap.PROT_WRITE):  # the input is read-only here
        fd = recv_handle(conn)
        maps.append(mmap.mmap(fd, os.fstat(fd).st_size, prot=prot))
        os.close(fd)
    return maps[0], maps[1]


def _send_result(conn: Any, result: Any, ms: float, output: Any) -> None:  # pragma: no cover - in the worker
    """Pixels through the output buffer where they fit, the rest (or everything) pickled."""
    import numpy as np

    radiograph = _strip(result)
    pixels = radiograph.pixels
    if (output is not None and isinstance(pixels, np.ndarray) and pixels.dtype == np.float32 and pixels.ndim == 2
            and pixels.nbytes <= len(output)):
        np.frombuffer(output, dtype=np.float32, count=pixels.size).reshape(pixels.shape)[...] = pixels
        radiograph.pixels = None
        conn.send(("ok", radiograph, ms, tuple(int(n) for n in pixels.shape)))
    else:
        conn.send(("ok", radiograph, ms, None))


def prepare_worker(memory_bytes: int) -> None:
    """Load every decoder library, then set the memory limit: the worker's last step before input.

    An import that first happens under the limit, while a large file fills the memory, can
    fail ("failed to map segment") and be mistaken for a bad file.
    """
    from lungseg.pixel_render import warm_up_decoders

    keep_freed_memory()
    warm_up_decoders()
    _limit_memory(memory_bytes)


def _serve(conn: Any, memory_bytes: int, limits: DecodeLimits) -> None:  # pragma: no cover - runs in the worker
    """The worker's loop: receive ``(ref, min_side, size)`` (``size`` bytes in the input buffer, or -1
    and the bytes through the pipe); answer ``("ok", radiograph, ms, shape)`` or ``("error", why)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    with contextlib.suppress(OSError):  # native decoders print (panic backtraces...) straight to fd 1/2
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    logging.disable(logging.CRITICAL)
    import warnings

    warnings.simplefilter("ignore")
    shared = _attach(conn)
    source, output = shared if shared is not None else (None, None)
    prepare_worker(memory_bytes)
    from lungseg.dicom_decode import value_validation_off

    conn.send(("ready",))
    with value_validation_off():  # for the worker's life: its warnings and logs go nowhere
        _answer(conn, source, output, limits)


def _answer(conn: Any, source: Any, output: Any, limits: DecodeLimits) -> None:  # pragma: no cover - in the worker
    """Decode requests until the daemon hangs up."""
    while True:
        try:
            ref, min_side, size = conn.recv()
            data = conn.recv_bytes() if size < 0 or source is None else source[:size]
        except (EOFError, OSError):
            return
        t0 = time.perf_counter()
        result = decode_in_process(data, ref, limits, min_side)
        del data
        try:
            if isinstance(result, DecodeFailure):
                conn.send(("error", result))
            else:
                _send_result(conn, result, (time.perf_counter() - t0) * 1000, output)
        except MemoryError:
            conn.send(("error", DecodeFailure("decoder_oom", "the decoded image did not fit the memory limit")))
        except (EOFError, OSError):
            return


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
        proc = ctx.Process(target=_serve, args=(child, self.memory_bytes, self.limits), daemon=True,
                           name="lungseg-decode")
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
    def decode(self, data: bytes, ref: str, min_side: int = 0) -> Any:
        """A Radiograph, or a :class:`DecodeFailure`. Raises :class:`WorkerUnavailableError` when no worker runs."""
        self.start()
        self._wait_ready()
        shared = self._buffers is not None and len(data) <= len(self._buffers.input)
        try:
            if shared:
                self._buffers.input[:len(data)] = data
                self._conn.send((ref, min_side, len(data)))
            else:
                self._conn.send((ref, min_side, -1))
                self._conn.send_bytes(data)  # no pickled copy of the file
        except (OSError, EOFError, ValueError):
            return self._died()
        if not self._conn.poll(self.timeout_seconds):
            return self._replaced("decoder_timeout", f"no result within {self.timeout_seconds:g} s; decoder killed")
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            return self._died()
        except Exception as exc:  # an answer that cannot be unpickled: treat like a crash
            return self._replaced("decoder_crash", f"unreadable answer from the decoder ({type(exc).__name__})")
        if message[0] == "ok":
            radiograph, decode_ms, shape = message[1], message[2], message[3]
            if shape is not None:
                radiograph.pixels = self._pixels_from_buffer(shape)
                if radiograph.pixels is None:
                    return self._replaced("decoder_crash", "the decoder answered an impossible image size")
            radiograph.facts["decode_ms_worker"] = round(decode_ms, 2)
            return radiograph
        return message[1]

    def _pixels_from_buffer(self, shape: Any) -> Any:
        """A copy of the float32 image the worker left in the output buffer, or ``None`` for a bad shape."""
        import numpy as np

        output = self._buffers.output if self._buffers is not None else None
        try:
            rows, columns = (int(n) for n in shape)
        except (TypeError, ValueError):
            return None
        if output is None or rows <= 0 or columns <= 0 or rows * columns * 4 > len(output):
            return None
        return np.frombuffer(output, dtype=np.float32, count=rows * columns).reshape(rows, columns).copy()

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
            return DecodeFailure("decoder_oom", "the decoder was killed (out of memory)")
        what = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return DecodeFailure("decoder_crash", f"the decoder died ({what})")
