"""A DICOM Storage SCP (C-STORE receiver) that feeds the watch folder.

The portable unit (or any DICOM sender) sends its radiographs to this node. The
receiver

* stores CR Image Storage and Digital X-Ray Image Storage (For Presentation and
  For Processing) instances, in the transfer syntaxes this installation can
  decode (uncompressed is always offered, so a sender can fall back to it);
* answers a C-STORE of any other storage SOP class with the failure status
  ``0x0122`` (Refused: SOP Class not supported). The presentation context is
  accepted on purpose: senders such as dcmtk ``storescu`` propose every storage
  class they know, and a per-instance status tells the sender (and this box's
  log and metrics) exactly which object was refused. Non-storage services are
  rejected at negotiation; Verification (C-ECHO) is answered;
* rejects associations whose calling AE title is not on the allow-list (when one
  is configured) or whose called AE title is not ours;
* writes each instance as received (file meta + the data set bytes, not
  re-encoded) to a hidden temp file in the watch folder, fsyncs it, renames it to
  ``<SOPInstanceUID>.dcm`` and fsyncs the folder, and only then answers
  ``0x0000 Success``. The watcher ignores hidden names, so no partial file is
  ever a candidate; a sender whose C-STORE failed knows the image is not here.

Duplicate SOP Instance UIDs: the first acknowledged instance is kept. A resend of
identical bytes is idempotent (``0x0000``, nothing rewritten, nothing doubled). A
different instance under a UID already stored is never written over it: its bytes
are kept aside in ``conflicts_dir`` (``<uid ref>-<sha256 prefix>.dcm`` plus a
``.reason.json`` with both sha256s) and the C-STORE is answered ``0x0111``
(Failure: Duplicate SOP Instance, PS3.7 Annex C, listed among the Storage statuses
by pynetdicom): the sender keeps its image and shows a failure an operator must
reconcile, rather than a success that would hide a swapped image.

Limits before success: with ``limits`` set (the daemon's
:class:`lungseg.dicom_decode.DecodeLimits`: ``max_file_mb``, ``max_pixels``,
``max_frames``), an instance over one of them is refused with ``0xA700`` (out of
resources) and nothing is written, instead of being acknowledged and quarantined
later.

A C-STORE request without a valid Affected SOP Instance UID (pynetdicom ignores such a
request without answering it) has its connection closed at once, not left to time out.

Connections are disciplined by :class:`~lungseg.edge_runtime.scp_guard.ConnectionGuard`
(negotiation deadline, a negotiation pool that evicts the oldest, per-host and total caps
on established associations, a total deadline per association). A command whose Affected
SOP Instance UID differs from the data set's is refused with ``0xC000``.

Other C-STORE failure statuses: ``0xA900`` (data set does not match the SOP class of
its presentation context), ``0xC000`` (cannot understand: no usable
SOPInstanceUID), ``0xA700`` (out of resources: the instance could not be written,
e.g. disk full).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from lungseg.atomic import atomic_copy_file, atomic_write
from lungseg.edge_runtime import audit
from lungseg.edge_runtime import service_metrics as metrics
from lungseg.edge_runtime.fsio import TEMP_SUFFIX, sha256_of
from lungseg.edge_runtime.logs import uid_ref, valid_uid
from lungseg.edge_runtime.modalities import ModalityList, is_loopback, parse_modalities
from lungseg.edge_runtime.retention import ReceivedFiles
from lungseg.edge_runtime.scp_guard import ConnectionGuard

log = logging.getLogger("lungseg.edge.receiver")

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1.1"
ACCEPTED_SOP_CLASSES = (CR_IMAGE_STORAGE, DX_PRESENTATION_STORAGE, DX_PROCESSING_STORAGE)
VERIFICATION = "1.2.840.10008.1.1"

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111  # a different instance under a UID already stored (kept aside)

TIMEOUT_SECONDS = 60.0
NETWORK_TIMEOUT_SECONDS = 30.0  # silence on a connection (a drip is bounded by the guard's deadlines)
SATURATED_SECONDS = 60.0  # /healthz says "receiver_saturated" this long after a connection found no free slot
MAX_PDU_BYTES = 16382  # the largest P-DATA PDU a sender may send us (pynetdicom's default, set explicitly)


class ReceiverUnavailableError(RuntimeError):
    """The receiver cannot start (pynetdicom missing, or the address cannot be bound)."""


def decodable_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes first, then every compressed one pydicom can decode here."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import (
        JPEG2000,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        RLELossless,
    )

    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
    for uid in (JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1, JPEGLossless, RLELossless, JPEG2000,
                JPEGLSNearLossless, JPEGBaseline8Bit, JPEGExtended12Bit):
        with contextlib.suppress(NotImplementedError, ValueError):
            if get_decoder(uid).is_available:
                syntaxes.append(uid)
    return [str(s) for s in syntaxes]


def valid_ae_title(title: str) -> bool:
    return 0 < len(title.strip()) <= 16 and title.isascii() and "\\" not in title and title.isprintable()


class StorageReceiver:
    """Receives CR/DX instances by C-STORE into ``folder`` (the watch folder)."""

    def __init__(self, folder: Path, port: int, ae_title: str = "LUNGSEG", bind: str = "127.0.0.1",
                 allowed_calling: Iterable[str] = ()):
        try:
            import pynetdicom  # noqa: F401
        except ImportError as exc:
            raise ReceiverUnavailableError("the DICOM receiver needs pynetdicom (pip install pynetdicom)") from exc
        self.folder = Path(folder)
        self.port, self.bind, self.ae_title = int(port), bind, ae_title
        self.modalities = ModalityList(parse_modalities(allowed_calling))  # AE titles, and their hosts
        self.allowed_calling = self.modalities.titles
        self._server: Any = None
        self.disk_guard: Callable[[], str | None] | None = None  # the reason free space is low (retention.py)
        self.received: ReceivedFiles | None = None  # what retention may delete later
        self.ssl_context: Any = None  # DICOM TLS (edge_runtime/tls.py): set, plain connections are refused
        self.conflicts_dir: Path | None = None  # where a conflicting duplicate is kept aside (None: not kept)
        self.limits: Any = None  # DecodeLimits checked before 0x0000 (None: not checked here)
        self.guard = ConnectionGuard()  # deadlines, negotiation pool, per-host cap (scp_guard.py)
        self._store_lock = threading.Lock()  # the duplicate check and the write, one instance at a time
        self._refusing: str | None = None  # the box-side reason the last store was refused (None: it was stored)

    # --- health --------------------------------------------------------------
    def problem(self) -> str | None:
        """What ``/healthz`` reports for the receiver (:func:`service_metrics.add_problem_source`), or ``None``:
        ``receiver_refusing`` from the first store refused for a reason of this box (the watch folder cannot be
        written, low disk space) until a store succeeds; ``receiver_saturated`` for
        :data:`SATURATED_SECONDS` after a connection was refused for want of a free slot."""
        if self._refusing is not None:
            return f"receiver_refusing: stores refused ({self._refusing})"
        last = self.guard.last_saturated
        if last is not None and time.monotonic() - last < SATURATED_SECONDS:
            return "receiver_saturated: connections refused for want of a free slot"
        return None

    # --- C-STORE -------------------------------------------------------------
    def _target(self, sop_uid: str) -> Path:
        return self.folder / f"{sop_uid}.dcm"

    def _write(self, source: Path, final: Path) -> None:
        """Copy the received file to a hidden temp file beside ``final``, fsync, rename, fsync the folder
        (:func:`lungseg.atomic.atomic_copy_file`: streamed, never all in memory)."""
        atomic_copy_file(source, final, mode=0o644)

    @staticmethod
    def _stored_sha(final: Path) -> str | None:
        """The sha256 of the instance already stored at ``final`` (``None``: nothing there)."""
        try:
            fd = os.open(final, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        digest = hashlib.sha256()
        with os.fdopen(fd, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def _keep_conflict(self, source: Path, size: int, sop_uid: str, first_sha: str, sha: str,
                       calling: str) -> Path | None:
        """Keep a conflicting duplicate aside with both hashes; returns where (``None``: not kept)."""
        if self.conflicts_dir is None:
            return None
        import datetime
        import json

        ref = (uid_ref(sop_uid) or "uid").replace(":", "-")
        target = self.conflicts_dir / f"{ref}-{sha[:12]}.dcm"
        reason = {"code": "duplicate_conflict", "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"), "sop": uid_ref(sop_uid), "first_sha256": first_sha, "sha256": sha,
                  "size": size, "calling_ae": calling, "kept": target.name}
        self.conflicts_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_copy_file(source, target, mode=0o600)
        atomic_write(target.with_name(target.name + ".reason.json"), json.dumps(reason, indent=2) + "\n",
                     mode=0o600)
        return target

    def _over_limit(self, ds: Any, size: int) -> str | None:
        """Which of :attr:`limits` the instance exceeds (``file_too_large``...), or ``None``."""
        limits = self.limits
        if limits is None:
            return None
        if size > limits.max_file_bytes:
            return "file_too_large"
        try:
            pixels = int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0)
            frames = int(ds.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):  # left to the decoder, which quarantines it with its reason
            return None
        if pixels > limits.max_pixels:
            return "too_many_pixels"
        if frames > limits.max_frames:
            return "too_many_frames"
        return None

    def _store_once(self, source: Path, size: int, sha: str, final: Path, sop_uid: str, calling: str) -> int | None:
        """Store the received file ``source`` unless the UID is taken: ``None`` when written, else the status."""
        with self._store_lock:
            first_sha = self._stored_sha(final)
            if first_sha is None:
                self._write(source, final)
                return None
        if first_sha == sha:  # an identical resend: already acknowledged, nothing to do
            log.info("identical resend of a stored instance: acknowledged again, not rewritten",
                     extra={"event": "received_again", "calling_ae": calling, "sop": uid_ref(sop_uid)})
            audit.record("receive", outcome="duplicate_identical", status="0x0000", sha256=sha, sop=sop_uid,
                         calling_ae=calling)
            return STATUS_SUCCESS
        kept: Path | None = None
        try:
            kept = self._keep_conflict(source, size, sop_uid, first_sha, sha, calling)
        except OSError as exc:
            log.error("cannot keep a conflicting duplicate aside (%s)", exc.strerror or exc,
                      extra={"event": "scp_conflict_not_kept", "sop": uid_ref(sop_uid)})
        log.error("C-STORE refused: a different instance under a SOP Instance UID already stored (first sha256 "
                  "%s, this one %s); the first is kept%s", first_sha[:12], sha[:12],
                  f", this one set aside as {kept.name}" if kept else "",
                  extra={"event": "scp_refused", "calling_ae": calling, "sop": uid_ref(sop_uid), "status": "0x0111"})
        metrics.count("refused", reason="duplicate_conflict")
        audit.record("receive", outcome="refused", status="0x0111", reason="duplicate_conflict", sha256=sha,
                     first_sha256=first_sha, sop=sop_uid, calling_ae=calling, path=kept)
        return STATUS_DUPLICATE_SOP_INSTANCE

    def handle_store(self, event: Any) -> int:
        """``EVT_C_STORE``: check, write atomically, answer with a status."""
        t0 = time.perf_counter()
        calling = event.assoc.requestor.ae_title
        context_class = str(event.context.abstract_syntax)
        if context_class not in ACCEPTED_SOP_CLASSES:
            log.warning("C-STORE refused: SOP class %s is not a CR/DX image", context_class,
                        extra={"event": "scp_refused", "calling_ae": calling, "status": "0x0122"})
            metrics.count("refused", reason="sop_class")
            audit.record("receive", outcome="refused", status="0x0122", reason="sop_class", calling_ae=calling)
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        try:
            source = Path(event.dataset_path)  # streamed to a temp file as it arrived (chunked receive)
            ds = dcmread(source, stop_before_pixels=True)  # the header: the pixels stay on disk
            sop_class = str(ds.get("SOPClassUID", ""))
            sop_uid = str(ds.get("SOPInstanceUID", ""))
        except Exception as exc:  # the data set could not even be parsed
            log.warning("C-STORE refused: unreadable data set (%s)", type(exc).__name__,
                        extra={"event": "scp_refused", "calling_ae": calling, "status": "0xC000"})
            metrics.count("refused", reason="unreadable")
            audit.record("receive", outcome="refused", status="0xC000", reason="unreadable", calling_ae=calling)
            return STATUS_CANNOT_UNDERSTAND
        if sop_class != context_class:
            log.warning("C-STORE refused: SOP class %s sent on a %s context", sop_class or "(none)", context_class,
                        extra={"event": "scp_refused", "calling_ae": calling, "status": "0xA900"})
            metrics.count("refused", reason="sop_class_mismatch")
            audit.record("receive", outcome="refused", status="0xA900", reason="sop_class_mismatch",
                         calling_ae=calling, sop=sop_uid)
            return STATUS_SOP_CLASS_MISMATCH
        if not valid_uid(sop_uid):
            log.warning("C-STORE refused: no valid SOPInstanceUID",
                        extra={"event": "scp_refused", "calling_ae": calling, "status": "0xC000"})
            metrics.count("refused", reason="invalid_uid")
            audit.record("receive", outcome="refused", status="0xC000", reason="invalid_uid", calling_ae=calling)
            return STATUS_CANNOT_UNDERSTAND
        command_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        if command_uid != sop_uid:  # the command names one instance, the data set another (or none)
            log.warning("C-STORE refused: the command's and the data set's SOP Instance UIDs differ",
                        extra={"event": "scp_refused", "calling_ae": calling, "status": "0xC000"})
            metrics.count("refused", reason="uid_mismatch")
            audit.record("receive", outcome="refused", status="0xC000", reason="uid_mismatch", calling_ae=calling,
                         sop=sop_uid)
            return STATUS_CANNOT_UNDERSTAND
        final = self._target(sop_uid)
        low = self.disk_guard() if self.disk_guard is not None else None
        if low:  # nothing is written: the sender keeps the image and retries later
            log.error("C-STORE refused: %s", low, extra={"event": "scp_refused", "calling_ae": calling,
                                                         "sop": uid_ref(sop_uid), "status": "0xA700"})
            metrics.count("refused", reason="disk_low")
            self._refusing = "disk_low"
            audit.record("receive", outcome="refused", status="0xA700", reason="disk_low", calling_ae=calling,
                         sop=sop_uid)
            return STATUS_OUT_OF_RESOURCES
        try:
            size = source.stat().st_size
            over = self._over_limit(ds, size)
            if over:  # refused before anything is written or acknowledged
                log.error("C-STORE refused: the instance exceeds a configured limit (%s)", over,
                          extra={"event": "scp_refused", "calling_ae": calling, "sop": uid_ref(sop_uid),
                                 "status": "0xA700"})
                metrics.count("refused", reason=over)
                audit.record("receive", outcome="refused", status="0xA700", reason=over, calling_ae=calling,
                             sop=sop_uid)
                return STATUS_OUT_OF_RESOURCES
            sha = sha256_of(source)
            answer = self._store_once(source, size, sha, final, sop_uid, calling)
            if answer is not None:
                return answer
        except OSError as exc:
            audit.record("receive", outcome="refused", status="0xA700", reason="write_failed", calling_ae=calling,
                         sop=sop_uid)
            log.error("C-STORE refused: cannot write the instance (%s)", exc.strerror or exc,
                      extra={"event": "scp_refused", "calling_ae": calling, "sop": uid_ref(sop_uid),
                             "status": "0xA700"})
            metrics.count("refused", reason="write_failed")
            self._refusing = "write_failed"
            return STATUS_OUT_OF_RESOURCES
        metrics.count("received")
        self._refusing = None
        audit.record("receive", outcome="stored", path=final, sha256=sha, sop=sop_uid,
                     study=str(ds.get("StudyInstanceUID", "")), calling_ae=calling)
        if self.received is not None:
            self.received.add(final, size, sha)
        metrics.observe_stage("receive", time.perf_counter() - t0)
        log.info("received", extra={"event": "received", "calling_ae": calling, "sop": uid_ref(sop_uid)})
        return STATUS_SUCCESS

    def _rejected(self, event: Any) -> None:
        """``EVT_ACCEPTED``/``EVT_REJECTED`` bookkeeping: count and log refused associations."""
        calling = event.assoc.requestor.ae_title
        # titles we accept, yet rejected: pynetdicom's local limit (maximum_associations), not a wrong AE title
        titles_ok = (event.assoc.acceptor.ae_title.strip() == self.ae_title.strip()
                     and (not self.allowed_calling or calling.strip() in self.allowed_calling))
        reason = "local_limit" if titles_ok else "association"
        if titles_ok:
            self.guard.last_saturated = time.monotonic()
        log.warning("association rejected (calling AE %r, called AE %r): %s", calling, event.assoc.acceptor.ae_title,
                    "local limit" if titles_ok else "AE title not accepted",
                    extra={"event": "scp_association_rejected", "calling_ae": calling, "reason": reason})
        metrics.count("refused", reason=reason)

    @staticmethod
    def command_problem(encoded: bytes) -> str | None:
        """A C-STORE request's command set, checked before pynetdicom decodes it: ``"invalid_request"`` when it
        lacks a valid Affected SOP Instance UID (or SOP Class UID, Message ID, Priority), else ``None``.
        pynetdicom would ignore such a request without an answer (both ends then wait for the network
        timeout) or fail on it in its reading thread; the guard closes the connection instead."""
        from io import BytesIO

        from pynetdicom.dsutils import decode

        try:
            command = decode(BytesIO(encoded), True, True)  # command sets are always Implicit VR Little Endian
            if command.get("CommandField") != 0x0001:  # not a C-STORE-RQ
                return None
            uid = str(command.get("AffectedSOPInstanceUID", "") or "").strip()
            complete = bool(command.get("AffectedSOPClassUID")) and command.get("MessageID") is not None \
                and command.get("Priority") is not None
        except Exception:  # a command set that does not parse is pynetdicom's to refuse
            return None
        if valid_uid(uid) and complete:
            return None
        log.warning("C-STORE request without a valid Affected SOP Instance UID: connection closed",
                    extra={"event": "scp_refused", "reason": "invalid_request"})
        audit.record("receive", outcome="refused", reason="invalid_request")
        return "invalid_request"

    def _requested(self, event: Any) -> None:
        """``EVT_REQUESTED``: a known calling AE title from a host (or port) its entry does not name is
        rejected here, before negotiation (an unknown title is left to pynetdicom's own check)."""
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        if not self.modalities.checks_hosts or calling not in self.allowed_calling:
            return
        address, port = assoc.requestor.address, assoc.requestor.port
        if self.modalities.allows(calling, address, port):
            return
        log.warning("association rejected: calling AE %r is not allowed from this host", calling,
                    extra={"event": "scp_association_rejected", "calling_ae": calling, "reason": "modality"})
        metrics.count("refused", reason="modality")
        audit.record("receive", outcome="refused", reason="modality", calling_ae=calling)
        assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected permanent, service user, calling AE not recognised
        assoc.is_rejected = True
        assoc.kill()

    def _accepted(self, event: Any) -> None:
        assoc = event.assoc
        refused = [str(c.abstract_syntax) for c in assoc.rejected_contexts
                   if str(c.abstract_syntax) in ACCEPTED_SOP_CLASSES]
        if refused:  # the sender offers a radiograph only in transfer syntaxes this box cannot decode
            log.warning("presentation context(s) for %s rejected: no transfer syntax this box can decode",
                        ", ".join(refused), extra={"event": "scp_context_rejected",
                                                   "calling_ae": assoc.requestor.ae_title})

    # --- lifecycle -----------------------------------------------------------
    def remove_stale_temps(self) -> int:
        """Delete this receiver's temp files a killed run left in the folder; returns how many."""
        removed = 0
        for path in self.folder.glob(f".*{TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        if removed:
            log.warning("removed %d partial received file(s) left by an interrupted run", removed)
        return removed

    def start(self) -> tuple[str, int]:
        """Listen in background threads; returns the bound (host, port).

        Raises :class:`ReceiverUnavailableError` when the address cannot be bound."""
        from pynetdicom import AE, AllStoragePresentationContexts, _config, evt

        # data sets are streamed to a temporary file as they arrive (pynetdicom deletes it after the handler), so
        # a large C-STORE never sits in memory; the guard refuses one over max_file_mb while it arrives
        _config.STORE_RECV_CHUNKED_DATASET = True
        self.guard.max_dataset = self.limits.max_file_bytes if self.limits is not None else None
        self.guard.check_command = self.command_problem

        ae = AE(ae_title=self.ae_title)
        # a backstop: the guard enforces its own caps (max_established, per_host; scp_* settings)
        ae.maximum_associations = self.guard.max_established + 4 * self.guard.pending_cap
        ae.acse_timeout = ae.dimse_timeout = TIMEOUT_SECONDS
        ae.network_timeout = NETWORK_TIMEOUT_SECONDS
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.require_called_aet = True
        if self.allowed_calling:
            ae.require_calling_aet = self.allowed_calling
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        for context in AllStoragePresentationContexts:  # accepted only to answer 0x0122 per instance
            if context.abstract_syntax is not None and context.abstract_syntax not in ACCEPTED_SOP_CLASSES:
                ae.add_supported_context(context.abstract_syntax, syntaxes[:4])
        ae.add_supported_context(VERIFICATION)
        self.modalities.resolve()
        handlers: list[Any] = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_REJECTED, self._rejected),
                               (evt.EVT_REQUESTED, self._requested),
                               (evt.EVT_ACCEPTED, self._accepted), *self.guard.handlers()]
        self.guard.start()
        try:
            self._server = ae.start_server((self.bind, self.port), block=False, evt_handlers=handlers,
                                           ssl_context=self.ssl_context)
        except OSError as exc:
            self.guard.stop()
            raise ReceiverUnavailableError(f"cannot listen on {self.bind}:{self.port}: {exc.strerror or exc}") \
                from exc
        host, port = self._server.server_address[:2]
        if not self.modalities.checks_hosts and not is_loopback(self.bind):
            log.warning("the DICOM receiver listens on %s and checks no sender's host (scp_accept_any): any "
                        "sender on the network%s can store images here", self.bind,
                        " using an allowed AE title" if self.allowed_calling else "", extra={"event": "scp_open"})
        log.warning("DICOM receiver %s listening on %s:%d%s", self.ae_title, host, port,
                    f", senders allowed: {', '.join(map(str, self.modalities.modalities))}"
                    if self.modalities.modalities else "",
                    extra={"event": "scp_config"})
        return str(host), int(port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.guard.stop()
