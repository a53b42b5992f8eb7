"""Admission of one ready file: read it safely, hash it, dedupe it, decode it in isolation.

Every file gets exactly one :class:`Outcome`; none is dropped without one:

``seen``         this file (same path reference, same content) was handled before
``duplicate``    its content, or its SOPInstanceUID, already has outputs
``quarantined``  an *input fault*: anything that comes from the file's bytes
``retry``        not decided yet: ``transient`` faults of the box (disk full, no
                 permission, memory, the ledger, the decode worker not starting) are
                 retried with exponential backoff, and left undone by ``--once``;
                 the others (file still changing, same content or UID twice in one
                 batch) are simply looked at again
``skipped``      a link, FIFO or device in the watch folder: never read, never copied
``vanished``     gone before it could be read

Before the untrusted bytes are decoded, the attempt is written to the ledger. If the
daemon dies while content is in progress (a native crash in an encoder or the model, the
OOM killer, a SIGKILL) the next start finds the unfinished attempt: that content is a
*suspect* and is processed alone, once no other file is waiting. A death while it is
alone is charged to it. One death with a fatal signal recorded in ``<state>/crash.log``
(SIGSEGV, SIGABRT -- also systemd's watchdog --, SIGBUS, SIGFPE, SIGILL) quarantines it
(``processing_crash``): no crash loop. A SIGKILL leaves no record and may well come from
outside (an operator, a restart), so only ``UNEXPLAINED_DEATHS`` of those while it was
alone quarantine it -- a bound on restart loops, not a guess after one. The files that
only shared its batch are never blamed.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset

from lungseg.edge_runtime import audit, service_metrics
from lungseg.edge_runtime.codes import DuplicateReason, QuarantineReason, RetryReason, SkipReason, Status
from lungseg.edge_runtime.config import EdgeConfig
from lungseg.edge_runtime.fsio import InputTooLargeError, NotRegularFileError, lstat_input, read_input, sha256_of
from lungseg.edge_runtime.isolate import DecodeFailure, DecodeWorker, WorkerUnavailableError, decode_in_process
from lungseg.edge_runtime.ledger import Ledger
from lungseg.edge_runtime.logs import uid_ref, valid_uid
from lungseg.edge_runtime.names import FileNamer
from lungseg.edge_runtime.quarantine import Quarantine
from lungseg.errors import LungsegError
from lungseg.gpu_decode import GpuDecodeError, GpuFrameDecoder, looks_like_j2k
from lungseg.imaging import Radiograph

log = logging.getLogger("lungseg.edge")

UNEXPLAINED_DEATHS = 25
PASSTHROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)


@dataclass
class Outcome:
    """What happened to one candidate file."""

    name: str
    status: Status
    code: str | None = None  # a reason code (codes.QuarantineReason, RetryReason, ...; a decoder's own as text)
    outputs: list[str] = field(default_factory=list)
    retry_after: float = 0.0
    path: Path | None = None
    transient: bool = False  # a fault of the box, not of the file: --once leaves it undone


@dataclass
class Admitted:
    """A decoded file waiting for inference."""

    path: Path
    name: str  # what logs, sidecars and quarantine call it
    size: int
    sha256: str
    radiograph: Radiograph
    decode_ms: float
    key: str = ""  # the ledger's reference
    data: bytes | None = field(default=None, repr=False)
    suspect: bool = False  # an earlier run died while this content was in progress: it goes alone

    @property
    def dataset(self) -> Dataset:
        """The decoded data set (never missing: :meth:`Admission.admit` quarantines a file without one)."""
        ds = self.radiograph.dataset
        if ds is None:
            raise LungsegError(f"{self.name}: decoded without a data set")
        return ds


def describe(exc: BaseException) -> str:
    """An exception for logs and reasons: its type and, for OS errors, the errno text (never a value)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


class OwnFiles(Protocol):
    """Files this box wrote into the watch folder itself (the receiver's, :class:`retention.ReceivedFiles`)."""

    def wrote(self, path: Path, sha256: str) -> bool: ...

    def forget_file(self, path: Path) -> None: ...


class Admission:
    """Turns a ready path into an :class:`Admitted` file or an :class:`Outcome`.

    ``own`` (set by the service when the receiver runs) names the files this box wrote itself: such a
    file is *moved* into quarantine even in ``copy`` mode (it is nobody else's, and a copy would double
    its disk use); a device's file is only ever copied unless ``quarantine_mode = "move"``."""

    def __init__(self, config: EdgeConfig, ledger: Ledger, quarantine: Quarantine, watch: Path):
        self.config = config
        self.ledger = ledger
        self.quarantine_store = quarantine
        self.watch = Path(watch)
        self.names = FileNamer(config.state_dir, self.watch, reveal=config.log_file_names)
        self.limits = config.decode_limits()
        self.decoder: DecodeWorker | None = None
        if config.isolate_decode:
            self.decoder = DecodeWorker(self.limits, memory_bytes=config.decode_memory_mb << 20,
                                        timeout_seconds=config.decode_timeout_seconds).start()
        self._failures: dict[str, int] = {}
        self.own: OwnFiles | None = None
        self.gpu_decoder: GpuFrameDecoder | None = None
        if getattr(config, "gpu_decode", False):
            self.gpu_decoder, reason = GpuFrameDecoder.create(max_pixels=self.limits.max_pixels,
                                                              max_frame_bytes=self.limits.max_file_bytes)
            if self.gpu_decoder is None:
                log.warning("gpu_decode: %s; JPEG 2000 is decoded on the CPU", reason,
                            extra={"event": "gpu_decode_unavailable"})
            else:
                log.info("gpu_decode: JPEG 2000 frames decoded with %s", self.gpu_decoder.label,
                         extra={"event": "gpu_decode_ready"})

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()

    # --- outcomes ----------------------------------------------------------------
    def label(self, path: Path) -> str:
        return self.names.ref(path)

    def retry(self, path: Path, code: str, what: str, exc: BaseException | None = None) -> Outcome:
        """A fault of the box: try again later, with exponential backoff."""
        key = self.names.key_for(path)
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(self.config.retry_seconds * 2 ** (failures - 1), self.config.max_retry_seconds)
        name = self.label(path)
        service_metrics.fault(code)  # the /healthz fault clock: started by the first, not reset by retries
        log.error("%s (%s); %s", what, describe(exc) if exc is not None else code,
                  "left undone by this --once run" if self.config.once else f"will retry in {delay:.0f} s",
                  extra={"event": code, "file": name, "attempt": failures})
        return Outcome(name, Status.RETRY, code=code, retry_after=delay, path=path, transient=True)

    def again(self, path: Path, code: str, delay: float) -> Outcome:
        """Not decided yet (still changing, a twin in the same batch): look again after ``delay``."""
        return Outcome(self.label(path), Status.RETRY, code=code, retry_after=delay, path=path)

    def settled(self, key: str) -> None:
        self._failures.pop(key, None)

    def quarantine(self, path: Path, key: str, sha: str, size: int, code: str, message: str,
                   data: bytes | None) -> Outcome:
        name = self.label(path)
        ours = data is not None and self.own is not None and self.own.wrote(path, sha)
        try:
            self.quarantine_store.put(path, key, sha, size, code, message, data=data, label=name, move=ours)
        except (OSError, sqlite3.Error) as exc:  # e.g. disk full: the input is fine, try again later
            return self.retry(path, RetryReason.QUARANTINE_FAILED, "could not quarantine", exc)
        if ours and self.own is not None:
            self.own.forget_file(path)  # moved: retention has nothing left to delete
        self.settled(key)
        log.warning("quarantined: %s", message, extra={"event": "quarantined", "file": name, "code": code})
        try:
            service_metrics.count("quarantined", reason=code)
        except Exception:  # metrics must never decide an outcome
            log.debug("metrics unavailable", exc_info=True)
        return Outcome(name, Status.QUARANTINED, code=code, path=path)

    def input_fault(self, path: Path, key: str, sha: str, size: int, code: str, message: str,
                    data: bytes | None, st: Any = None) -> Outcome:
        """Quarantine, unless the file changed recently: a sender may still be adding to it."""
        if st is not None and self.config.quarantine_grace_seconds > 0:
            age = time.time() - max(st.st_mtime, st.st_ctime)
            if age < self.config.quarantine_grace_seconds:
                self.ledger.end_attempt(sha)
                log.info("unusable now (%s) but changed %.1f s ago: waiting before quarantining it", code, age,
                         extra={"event": "unsettled", "file": self.label(path), "code": code})
                return self.again(path, RetryReason.UNSETTLED, self.config.quarantine_grace_seconds - age + 0.1)
        return self.quarantine(path, key, sha, size, code, message, data)

    # --- admission -----------------------------------------------------------------
    def admit(self, path: Path, batch_uids: set[str], batch_shas: set[str],
              first: bool = True) -> tuple[Admitted | None, Outcome | None]:
        """``first``: nothing is admitted to this batch yet (a suspect is only admitted first, and alone)."""
        name, key = self.label(path), self.names.key_for(path)
        try:
            st = lstat_input(path, self.watch)
        except (FileNotFoundError, NotADirectoryError):
            return None, Outcome(name, Status.VANISHED, path=path)
        except NotRegularFileError as exc:
            log.warning("not read: %s", exc.strerror, extra={"event": "skipped", "file": name})
            return None, Outcome(name, Status.SKIPPED, code=SkipReason.NOT_REGULAR_FILE, path=path)
        sha = self.ledger.sha_for_path(key, st)
        if sha is not None and self.ledger.file_status(sha, key) is not None:
            return None, self._seen(path, name, key, sha)
        try:
            data, fst = read_input(path, self.limits.max_file_bytes)
        except (FileNotFoundError, NotADirectoryError):
            return None, Outcome(name, Status.VANISHED, path=path)
        except NotRegularFileError as exc:
            log.warning("not read: %s", exc.strerror, extra={"event": "skipped", "file": name})
            return None, Outcome(name, Status.SKIPPED, code=SkipReason.NOT_REGULAR_FILE, path=path)
        except InputTooLargeError as exc:
            sha = sha256_of(path) if exc.errno == errno.EFBIG and st.st_size < (64 << 30) else "0" * 64
            self.ledger.remember_path(key, st, sha)  # a rescan or restart must not hash it again
            if self.ledger.file_status(sha, key) is not None:
                return None, self._seen(path, name, key, sha)
            message = f"file too large: {exc.strerror}; not copied"
            return None, self.input_fault(path, key, sha, st.st_size, QuarantineReason.FILE_TOO_LARGE, message, None,
                                          st)
        if (fst.st_size, fst.st_mtime_ns, fst.st_ino) != (st.st_size, st.st_mtime_ns, st.st_ino):
            return None, self.again(path, RetryReason.CHANGED, self.config.settle_seconds)
        size = len(data)
        sha = hashlib.sha256(data).hexdigest()
        self.ledger.remember_path(key, fst, sha)
        if self.ledger.file_status(sha, key) is not None:
            return None, self._seen(path, name, key, sha)
        known = self.ledger.file_status(sha)
        if known is not None and known["status"] in (Status.DONE, Status.DUPLICATE):
            self.ledger.record_duplicate(sha256=sha, sop_uid=known["sop_uid"], name=key, size=size,
                                         code=DuplicateReason.SAME_CONTENT)
            audit.record("process", file=key, sha256=sha, sop=known["sop_uid"], outcome="duplicate",
                         code=str(DuplicateReason.SAME_CONTENT))
            self.settled(key)
            log.info("identical content already handled; no new output",
                     extra={"event": "duplicate", "file": name, "first_file": known["name"],
                            "status": known["status"]})
            return None, Outcome(name, Status.DUPLICATE, code=DuplicateReason.SAME_CONTENT, path=path)
        if sha in batch_shas:  # a twin earlier in this batch: decide once that one is recorded
            return None, self.again(path, RetryReason.SAME_CONTENT_IN_BATCH, 0.0)
        if known is not None:
            log.info("content quarantined before under another name (%s): trying it again", known["code"],
                     extra={"event": "requarantine_check", "file": name})
        prior = self.ledger.attempt(sha)
        if prior is not None and (prior["crashes"] >= 1 or prior["deaths"] >= UNEXPLAINED_DEATHS):
            how = (f"{prior['crashes']} fatal crash(es)" if prior["crashes"] else
                   f"{prior['deaths']} abnormal stops")
            return None, self.quarantine(path, key, sha, size, QuarantineReason.PROCESSING_CRASH,
                                         f"the daemon died while processing this content alone ({how})", data)
        if prior is not None and not first:
            return None, self.again(path, RetryReason.SUSPECT_WAITS_TO_GO_ALONE, 0.0)
        self.ledger.begin_attempt(sha, key)  # before any untrusted byte is decoded
        batch_shas.add(sha)
        t0 = time.perf_counter()
        result = self._decode(data, name)
        decode_ms = (time.perf_counter() - t0) * 1000
        if isinstance(result, DecodeFailure):
            if result.transient:
                self.ledger.end_attempt(sha)
                batch_shas.discard(sha)
                return None, self.retry(path, result.code, result.reason)
            return None, self.input_fault(path, key, sha, size, result.code, result.reason, data, fst)
        ds = result.dataset
        missing = [k for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
                   if ds is None or not ds.get(k)]
        if ds is None or missing:  # no data set: every UID is missing
            return None, self.input_fault(path, key, sha, size, QuarantineReason.MISSING_UID,
                                          f"no {', '.join(missing)} in the data set", data, fst)
        bad = [k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not valid_uid(ds.get(k))]
        if bad:  # they name output files and folders: never let them be paths
            return None, self.input_fault(path, key, sha, size, QuarantineReason.INVALID_UID,
                                          f"{', '.join(bad)} not a valid DICOM UID", data, fst)
        sop_uid = str(ds.SOPInstanceUID)
        if sop_uid in batch_uids:  # decide after the first copy is committed
            self.ledger.end_attempt(sha)
            batch_shas.discard(sha)
            return None, self.again(path, RetryReason.SAME_UID_IN_BATCH, 0.0)
        previous = self.ledger.instance(sop_uid)
        if previous is not None:
            self.ledger.record_duplicate(sha256=sha, sop_uid=sop_uid, name=key, size=size)
            audit.record("process", file=key, sha256=sha, sop=sop_uid, study=str(ds.StudyInstanceUID),
                         outcome="duplicate", code="same_sop_instance")
            self.settled(key)
            log.info("duplicate of an instance already processed; no new output",
                     extra={"event": "duplicate", "file": name, "sop": uid_ref(sop_uid),
                            "first_file": previous["source_name"]})
            return None, Outcome(name, Status.DUPLICATE, path=path)
        batch_uids.add(sop_uid)
        return Admitted(path, name, size, sha, result, decode_ms, key=key, data=data, suspect=prior is not None), None

    def is_suspect(self, path: Path) -> bool:
        """Whether an earlier run died while this file's (cached) content was in progress."""
        try:
            st = lstat_input(path, self.watch)
        except OSError:
            return False
        sha = self.ledger.sha_for_path(self.names.key_for(path), st)
        return sha is not None and self.ledger.attempt(sha) is not None

    def _seen(self, path: Path, name: str, key: str, sha: str) -> Outcome:
        status = self.ledger.file_status(sha, key) or {}
        self.settled(key)
        log.debug("already handled", extra={"event": "seen", "file": name, "status": status.get("status")})
        return Outcome(name, Status.SEEN, code=status.get("status"), path=path)

    def _decode(self, data: bytes, name: str) -> Radiograph | DecodeFailure:
        min_side = int(getattr(self.config, "decode_min_side", 0) or 0)
        # the overlay SC shows the source at full resolution: decode it once at full size (without an SC, only
        # the reduced resolution the model needs)
        display = bool(getattr(self.config, "sc", True))
        if self.gpu_decoder is not None and looks_like_j2k(data):
            try:
                return decode_in_process(data, name, self.limits, min_side, display, frame_decoder=self.gpu_decoder)
            except GpuDecodeError as exc:  # refused or failed on the GPU: the CPU decoder in its worker decides
                log.info("gpu_decode: %s; decoding on the CPU", exc,
                         extra={"event": "gpu_decode_fallback", "file": name})
            except MemoryError:
                return DecodeFailure(RetryReason.OUT_OF_MEMORY, "no memory to decode now", transient=True)
        if self.decoder is None:
            try:
                return decode_in_process(data, name, self.limits, min_side, display)
            except MemoryError:
                return DecodeFailure(RetryReason.OUT_OF_MEMORY, "no memory to decode now", transient=True)
        try:
            return self.decoder.decode(data, name, min_side, display)
        except WorkerUnavailableError as exc:
            return DecodeFailure(RetryReason.DECODER_UNAVAILABLE, str(exc), transient=True)

