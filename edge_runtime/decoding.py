"""Decoding untrusted bytes: in this process, or as the isolated decode worker.

:func:`decode_in_process` never raises for a bad input: it returns a decoded
:class:`~lungseg.imaging.Radiograph` or a :class:`DecodeFailure` with a reason code:

``decoder_oom``      decoding ran out of memory (``MemoryError``, or a library that could
                     not be mapped under the worker's address-space limit)
``decode_error``     any other exception, with its type name only

plus the reason codes of :mod:`lungseg.dicom_decode`. The rest of this module runs in the
worker process that :class:`lungseg.edge_runtime.isolate.DecodeWorker` starts (through
:mod:`~lungseg.edge_runtime.worker_entry`, which limits the libraries' threads before this
module loads them): :func:`prepare_worker` loads every decoder library and then sets the
memory limit, and :func:`run_worker` answers decode requests until the daemon hangs up.
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

from lungseg.dicom_decode import DEFAULT_LIMITS, DecodeLimits, FrameDecoder, read_dicom, value_validation_off
from lungseg.edge_runtime.codes import QuarantineReason
from lungseg.gpu_decode import GpuDecodeError
from lungseg.imaging import Radiograph, UnreadableImageError
from lungseg.pixel_render import warm_up_decoders

_PASSTHROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)


@dataclass(frozen=True)
class DecodeFailure:
    """Why a file could not be decoded; ``transient`` failures are retried, the rest quarantined."""

    code: str
    reason: str
    transient: bool = False


def decode_in_process(data: bytes, ref: str, limits: DecodeLimits = DEFAULT_LIMITS,
                      min_side: int = 0, display: bool = False,
                      frame_decoder: FrameDecoder | None = None) -> Radiograph | DecodeFailure:
    """Decode ``data`` here; returns a Radiograph or a :class:`DecodeFailure` (never raises for bad input,
    except :class:`~lungseg.gpu_decode.GpuDecodeError` from ``frame_decoder``: the caller then decodes on the CPU).

    ``display``: also the full-resolution 8-bit image for the overlay (see :func:`read_dicom`)."""
    try:
        return read_dicom(ref, data=data, limits=limits, min_side=min_side, display=display,
                          frame_decoder=frame_decoder)
    except GpuDecodeError:
        raise
    except UnreadableImageError as exc:
        if _caused_by(exc, MemoryError):  # wrapped by pydicom / read_dicom
            return DecodeFailure(QuarantineReason.DECODER_OOM,
                                 "decoding ran out of memory (the image is too large for the limit)")
        return DecodeFailure(getattr(exc, "code", None) or "unreadable", exc.reason)
    except MemoryError:
        return DecodeFailure(QuarantineReason.DECODER_OOM, "decoding ran out of memory")
    except _PASSTHROUGH:
        raise
    except BaseException as exc:  # native extensions raise BaseException subclasses (pyo3 panics)
        if _out_of_address_space(exc):
            return DecodeFailure(QuarantineReason.DECODER_OOM,
                                 "decoding ran out of memory (a library could not be mapped)")
        return DecodeFailure(QuarantineReason.DECODE_ERROR, f"decoder failed ({type(exc).__name__})")


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


def _strip(radiograph: Radiograph) -> Radiograph:
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


def display_offset(pixels_nbytes: int) -> int:
    """Where the 8-bit display image starts in the output buffer: after the float32 pixels, 64-byte aligned."""
    return (pixels_nbytes + 63) // 64 * 64


def _send_result(conn: Any, result: Radiograph, ms: float, output: Any) -> None:  # pragma: no cover - in the worker
    """Pixels (and the display image) through the output buffer where they fit, the rest pickled."""
    import numpy as np

    radiograph: Any = _strip(result)  # sent without its pixels when they go through the buffer
    pixels, display = radiograph.pixels, radiograph.display
    if not (output is not None and isinstance(pixels, np.ndarray) and pixels.dtype == np.float32
            and pixels.ndim == 2 and pixels.nbytes <= len(output)):
        conn.send(("ok", radiograph, ms, None, None))
        return
    np.frombuffer(output, dtype=np.float32, count=pixels.size).reshape(pixels.shape)[...] = pixels
    radiograph.pixels = None
    shape = tuple(int(n) for n in pixels.shape)
    start = display_offset(pixels.nbytes)
    if (isinstance(display, np.ndarray) and display.dtype == np.uint8 and display.ndim == 2
            and start + display.nbytes <= len(output)):
        np.frombuffer(output, dtype=np.uint8, count=display.size, offset=start).reshape(display.shape)[...] = display
        radiograph.display = None
        conn.send(("ok", radiograph, ms, shape, tuple(int(n) for n in display.shape)))
    else:
        conn.send(("ok", radiograph, ms, shape, None))


def prepare_worker(memory_bytes: int) -> None:
    """Load every decoder library, then set the memory limit: the worker's last step before input.

    An import that first happens under the limit, while a large file fills the memory, can
    fail ("failed to map segment") and be mistaken for a bad file. (This module's own imports,
    :mod:`lungseg.pixel_render` and :mod:`lungseg.dicom_decode` among them, happen when the
    spawned worker unpickles its target, before this.)
    """
    keep_freed_memory()
    warm_up_decoders()
    _limit_memory(memory_bytes)


def run_worker(conn: Any, memory_bytes: int, limits: dict[str, int]) -> None:  # pragma: no cover - in the worker
    """The worker's loop: receive ``(ref, min_side, display, size)`` (``size`` bytes in the input buffer, or -1
    and the bytes through the pipe); answer ``("ok", radiograph, ms, shape, display_shape)`` or
    ``("error", why)``.

    Entered through :func:`lungseg.edge_runtime.worker_entry.main`, which limits the libraries'
    threads before this module (and NumPy, OpenCV, pydicom with it) is imported."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    with contextlib.suppress(OSError):  # native decoders print (panic backtraces...) straight to fd 1/2
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    logging.disable(logging.CRITICAL)
    import warnings

    warnings.simplefilter("ignore")
    shared = _attach(conn)
    source, output = shared if shared is not None else (None, None)
    prepare_worker(memory_bytes)
    conn.send(("ready",))
    with value_validation_off():  # for the worker's life: its warnings and logs go nowhere
        _answer(conn, source, output, DecodeLimits(**limits))


def _answer(conn: Any, source: Any, output: Any, limits: DecodeLimits) -> None:  # pragma: no cover - in the worker
    """Decode requests until the daemon hangs up."""
    while True:
        try:
            ref, min_side, display, size = conn.recv()
            data = conn.recv_bytes() if size < 0 or source is None else source[:size]
        except (EOFError, OSError):
            return
        t0 = time.perf_counter()
        result = decode_in_process(data, ref, limits, min_side, display)
        del data
        try:
            if isinstance(result, DecodeFailure):
                conn.send(("error", result))
            else:
                _send_result(conn, result, (time.perf_counter() - t0) * 1000, output)
        except MemoryError:
            conn.send(("error", DecodeFailure(QuarantineReason.DECODER_OOM,
                                              "the decoded image did not fit the memory limit")))
        except (EOFError, OSError):
            return
