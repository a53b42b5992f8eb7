"""Decode untrusted files in a separate, resource-limited worker process.

A malformed file can make a native decoder panic (``pyo3_runtime.PanicException``
derives from ``BaseException``), crash, loop or allocate without bound. Decoding
therefore runs in one persistent worker process (spawned, not forked) with an
address-space limit (``RLIMIT_AS``) and a per-file timeout; the daemon only ever
sees a decoded :class:`~lungseg.imaging.Radiograph` or a :class:`DecodeFailure`:

``decoder_crash``    the worker died (a signal other than our own kill)
``decoder_timeout``  no answer within the timeout: the worker is killed
``decoder_oom``      the worker ran out of its memory limit (``MemoryError``, or a SIGKILL
                     we did not send: the kernel's OOM killer)
``decode_error``     any other exception, with its type name only

plus the reason codes of :mod:`lungseg.dicom_decode`. A dead or killed worker is
respawned for the next file, so one poison file costs one respawn, not the batch.
The worker ignores SIGINT/SIGTERM (the daemon decides when to stop) and dies with
its parent. Its logging and warnings are silenced: library messages can quote
patient data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from lungseg.dicom_decode import DEFAULT_LIMITS, DecodeLimits

log = logging.getLogger("lungseg.edge")

STARTUP_TIMEOUT_SECONDS = 120.0
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
        return DecodeFailure("decode_error", f"decoder failed ({type(exc).__name__})")


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            return False
        if isinstance(current, kind):
            return True
        current = current.__cause__ or current.__context__
    return False


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


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _serve(conn: Any, memory_bytes: int, limits: DecodeLimits) -> None:  # pragma: no cover - runs in the worker
    """The worker's loop: receive ``(data, ref, min_side)``; answer ``("ok", radiograph, ms)`` or ``("error", why)``."""
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
    _limit_memory(memory_bytes)
    import lungseg.dicom_decode  # noqa: F401 - warm the imports (numpy, pydicom, codecs) once

    with contextlib.suppress(Exception):
        import pydicom.pixels.decoders  # noqa: F401
    conn.send(("ready",))
    while True:
        try:
            ref, min_side = conn.recv()
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        t0 = time.perf_counter()
        result = decode_in_process(data, ref, limits, min_side)
        del data
        try:
            if isinstance(result, DecodeFailure):
                conn.send(("error", result))
            else:
                conn.send(("ok", _strip(result), (time.perf_counter() - t0) * 1000))
        except MemoryError:
            conn.send(("error", DecodeFailure("decoder_oom", "the decoded image did not fit the memory limit")))
        except (EOFError, OSError):
            return


class DecodeWorker:
    """One persistent decode process, respawned after a crash, kill or timeout."""

    def __init__(self, limits: DecodeLimits = DEFAULT_LIMITS, memory_bytes: int = 2 << 30,
                 timeout_seconds: float = 60.0):
        self.limits = limits
        self.memory_bytes = int(memory_bytes)
        self.timeout_seconds = float(timeout_seconds)
        self.respawns = 0
        self._proc: Any = None
        self._conn: Any = None
        self._ready = False

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
        return self

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

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # --- work ---------------------------------------------------------------------
    def decode(self, data: bytes, ref: str, min_side: int = 0) -> Any:
        """A Radiograph, or a :class:`DecodeFailure`. Raises :class:`WorkerUnavailableError` when no worker runs."""
        self.start()
        self._wait_ready()
        try:
            self._conn.send((ref, min_side))
            self._conn.send_bytes(data)  # no pickled copy of the file
        except (OSError, EOFError, ValueError):
            return self._died()
        if not self._conn.poll(self.timeout_seconds):
            self._discard()
            self.respawns += 1
            self.start()
            return DecodeFailure("decoder_timeout", f"no result within {self.timeout_seconds:g} s; decoder killed")
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            return self._died()
        except Exception as exc:  # an answer that cannot be unpickled: treat like a crash
            self._discard()
            self.respawns += 1
            self.start()
            return DecodeFailure("decoder_crash", f"unreadable answer from the decoder ({type(exc).__name__})")
        if message[0] == "ok":
            radiograph, decode_ms = message[1], message[2]
            radiograph.facts["decode_ms_worker"] = round(decode_ms, 2)
            return radiograph
        return message[1]

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
