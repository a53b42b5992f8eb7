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

Other C-STORE failure statuses: ``0xA900`` (data set does not match the SOP class of
its presentation context), ``0xC000`` (cannot understand: no usable
SOPInstanceUID), ``0xA700`` (out of resources: the instance could not be written,
e.g. disk full).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lungseg.atomic import atomic_write
from lungseg.edge_runtime import service_metrics as metrics
from lungseg.edge_runtime.fsio import TEMP_SUFFIX
from lungseg.edge_runtime.logs import uid_ref, valid_uid

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

MAX_ASSOCIATIONS = 8
TIMEOUT_SECONDS = 60.0


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
        self.allowed_calling = [a.strip() for a in allowed_calling if a.strip()]
        self._server: Any = None

    # --- C-STORE -------------------------------------------------------------
    def _target(self, sop_uid: str) -> Path:
        return self.folder / f"{sop_uid}.dcm"

    def _write(self, data: bytes, final: Path) -> None:
        """Hidden temp file beside ``final``, fsync, rename, fsync the folder (:func:`lungseg.atomic.atomic_write`)."""
        atomic_write(final, data, mode=0o644)

    def handle_store(self, event: Any) -> int:
        """``EVT_C_STORE``: check, write atomically, answer with a status."""
        import time

        t0 = time.perf_counter()
        calling = event.assoc.requestor.ae_title
        context_class = str(event.context.abstract_syntax)
        if context_class not in ACCEPTED_SOP_CLASSES:
            log.warning("C-STORE refused: SOP class %s is not a CR/DX image", context_class,
                        extra={"event": "scp_refused", "calling_ae": calling, "status": "0x0122"})
            metrics.count("refused", reason="sop_class")
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        try:
            ds = event.dataset
            sop_class = str(ds.get("SOPClassUID", ""))
            sop_uid = str(ds.get("SOPInstanceUID", ""))
        except Exception as exc:  # the data set could not even be parsed
            log.warning("C-STORE refused: unreadable data set (%s)", type(exc).__name__,
                        extra={"event": "scp_refused", "calling_ae": calling, "status": "0xC000"})
            metrics.count("refused", reason="unreadable")
            return STATUS_CANNOT_UNDERSTAND
        if sop_class != context_class:
            log.warning("C-STORE refused: SOP class %s sent on a %s context", sop_class or "(none)", context_class,
                        extra={"event": "scp_refused", "calling_ae": calling, "status": "0xA900"})
            metrics.count("refused", reason="sop_class_mismatch")
            return STATUS_SOP_CLASS_MISMATCH
        if not valid_uid(sop_uid):
            log.warning("C-STORE refused: no valid SOPInstanceUID",
                        extra={"event": "scp_refused", "calling_ae": calling, "status": "0xC000"})
            metrics.count("refused", reason="invalid_uid")
            return STATUS_CANNOT_UNDERSTAND
        final = self._target(sop_uid)
        try:
            self._write(event.encoded_dataset(include_meta=True), final)
        except OSError as exc:
            log.error("C-STORE refused: cannot write the instance (%s)", exc.strerror or exc,
                      extra={"event": "scp_refused", "calling_ae": calling, "sop": uid_ref(sop_uid),
                             "status": "0xA700"})
            metrics.count("refused", reason="write_failed")
            return STATUS_OUT_OF_RESOURCES
        metrics.count("received")
        metrics.observe_stage("receive", time.perf_counter() - t0)
        log.info("received", extra={"event": "received", "calling_ae": calling, "sop": uid_ref(sop_uid)})
        return STATUS_SUCCESS

    def _rejected(self, event: Any) -> None:
        """``EVT_ACCEPTED``/``EVT_REJECTED`` bookkeeping: count and log refused associations."""
        calling = event.assoc.requestor.ae_title
        log.warning("association rejected (calling AE %r, called AE %r)", calling, event.assoc.acceptor.ae_title,
                    extra={"event": "scp_association_rejected", "calling_ae": calling})
        metrics.count("refused", reason="association")

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
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_SECONDS
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
        handlers: list[Any] = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_REJECTED, self._rejected),
                               (evt.EVT_ACCEPTED, self._accepted)]
        try:
            self._server = ae.start_server((self.bind, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise ReceiverUnavailableError(f"cannot listen on {self.bind}:{self.port}: {exc.strerror or exc}") \
                from exc
        host, port = self._server.server_address[:2]
        if not self.allowed_calling and self.bind not in ("127.0.0.1", "::1", "localhost"):
            log.warning("the DICOM receiver listens on %s with no calling-AE allow-list: any sender on the "
                        "network can store images here", self.bind, extra={"event": "scp_open"})
        log.warning("DICOM receiver %s listening on %s:%d%s", self.ae_title, host, port,
                    f", calling AEs allowed: {', '.join(self.allowed_calling)}" if self.allowed_calling else "",
                    extra={"event": "scp_config"})
        return str(host), int(port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
