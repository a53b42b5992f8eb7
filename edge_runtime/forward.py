"""C-STORE forwarding of the DICOM outputs to a PACS, when ``forward_host`` is configured.

The queue is durable: forwarding rows are added to the ledger in the same
transaction that marks a file done, and a background thread sends what is due,
one association per round, retrying with exponential backoff. Outputs are sent
as written (an RLE or JPEG-LS Lossless SC) when the peer accepts that transfer
syntax, otherwise decompressed to Explicit VR Little Endian. ``pynetdicom`` is a
base dependency of lungseg; it is imported only when forwarding is configured
(:func:`check_available`, at start-up), so a service that does not forward never loads it.

An output that failed ``max_attempts`` times, or that is no longer on disk, is
dead-lettered: moved out of the queue (``forward_dead`` in the ledger), logged,
counted, and reported by ``/healthz`` until ``lungseg-edge forward retry`` queues it
again. While deliveries wait on a backoff, a C-ECHO probe every ``retry_seconds``
brings them forward as soon as the peer answers again. Delivery is at least once:
a peer slower than the DIMSE timeout may get an instance twice (same SOP Instance
UID; see INSTALL.md). Errors are described by type and errno text only
(:func:`~lungseg.edge_runtime.admission.describe`): never a UID or a path.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from lungseg.edge_runtime import audit
from lungseg.edge_runtime import service_metrics as metrics
from lungseg.edge_runtime.admission import describe
from lungseg.edge_runtime.ledger import Ledger
from lungseg.edge_runtime.logs import uid_ref

log = logging.getLogger("lungseg.edge.forward")

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR: the TID 1500 Measurement Report
MAX_BACKOFF_SECONDS = 3600.0
TIMEOUT_SECONDS = 15.0
DEFAULT_MAX_ATTEMPTS = 12
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class ForwardUnavailableError(RuntimeError):
    """Forwarding is configured but pynetdicom (a base dependency) cannot be imported: a broken installation."""


def check_available() -> None:
    try:
        import pynetdicom  # noqa: F401
    except ImportError as exc:
        raise ForwardUnavailableError("forwarding needs pynetdicom (pip install pynetdicom)") from exc


def output_kind(path: str) -> str:
    """``sc``, ``seg`` or ``sr`` from an output path (``<study>/<sop>.sc.dcm``)."""
    parts = path.rsplit(".", 2)
    return parts[-2] if len(parts) == 3 else "other"


def pending_count(ledger: Ledger) -> int:
    return int(ledger.db.execute("SELECT COUNT(*) FROM forward WHERE status='pending'").fetchone()[0])


class Forwarder:
    """Sends queued outputs (paths relative to ``out``) to one DICOM peer."""

    def __init__(self, out: Path, state_dir: Path, host: str, port: int, called_ae: str, calling_ae: str,
                 retry_seconds: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS):
        check_available()
        self.out = Path(out)
        self.state_dir = Path(state_dir)
        self.host, self.port = host, int(port)
        self.called_ae, self.calling_ae = called_ae, calling_ae
        self.retry_seconds = max(1.0, float(retry_seconds))
        self.max_attempts = max(1, int(max_attempts))
        self.next_probe = 0.0
        self.tls_args: tuple[Any, str] | None = None  # DICOM TLS: (ssl context, name to check), edge_runtime/tls.py
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- one round -----------------------------------------------------------
    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_SECONDS
        return ae

    def probe(self, ledger: Ledger, now: float | None = None) -> bool:
        """While deliveries wait on a backoff: a C-ECHO (at most every ``retry_seconds``); when the peer answers,
        every pending output is due at once. Returns whether that happened."""
        now = time.time() if now is None else now
        if now < self.next_probe or not pending_count(ledger):
            return False
        self.next_probe = now + self.retry_seconds
        if ledger.forward_due(now, 1):
            return False  # something is due anyway: the next round tries it
        ae = self._ae()
        ae.add_requested_context("1.2.840.10008.1.1")  # Verification
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=self.tls_args)
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        if not status or int(getattr(status, "Status", -1)) != 0:
            return False
        moved = ledger.forward_reschedule(now)
        if moved:
            log.warning("the peer answers C-ECHO again: %d delivery(ies) brought forward", moved,
                        extra={"event": "forward_peer_back", "peer": self.called_ae, "outputs": moved})
        return bool(moved)

    def send_due(self, ledger: Ledger, limit: int = 32) -> int:
        """Send what is due now over one association; returns how many were delivered."""
        due = ledger.forward_due(time.time(), limit)
        if not due:
            return 0
        missing = [row for row in due if not (self.out / row["path"]).is_file()]
        for row in missing:  # deleted from disk: retrying cannot help
            self._dead(ledger, row, "output missing from disk")
        due = [row for row in due if row not in missing]
        if not due:
            return 0
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, RLELossless

        ae = self._ae()
        ae.add_requested_context(SC_STORAGE, [RLELossless])
        ae.add_requested_context(SC_STORAGE, [JPEGLSLossless])
        ae.add_requested_context(SC_STORAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_requested_context(SEG_STORAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_requested_context(SR_STORAGE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, tls_args=self.tls_args)
        if not assoc.is_established:
            tls_error = getattr(self.tls_args[0], "last_error", None) if self.tls_args else None
            for row in due:  # a TLS failure names its reason (edge_runtime/tls.py: never a UID)
                self._failed(ledger, row, tls_error or "association with the peer was not established")
            return 0
        sent = 0
        try:
            for row in due:
                if self._stop.is_set():
                    break
                path = self.out / row["path"]
                t0 = time.perf_counter()
                try:
                    ds = dcmread(path)
                    syntax = ds.file_meta.TransferSyntaxUID
                    accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
                    if (ds.SOPClassUID, syntax) not in accepted:
                        ds.decompress()  # e.g. the peer does not take RLE: send it uncompressed
                    status = assoc.send_c_store(ds)
                except FileNotFoundError:
                    self._dead(ledger, row, "output missing from disk")
                    continue
                except (OSError, ValueError, RuntimeError, AttributeError, InvalidDicomError) as exc:
                    self._failed(ledger, row, describe(exc))  # type and errno text: never a UID or a path
                    continue
                code = int(getattr(status, "Status", -1)) if status else -1
                if code in SUCCESS_STATUSES:
                    ledger.forward_sent(row["path"])
                    sent += 1
                    metrics.observe_stage("forward", time.perf_counter() - t0)
                    metrics.count("forwarded", kind=output_kind(row["path"]))
                    metrics.forwarded_ok()
                    audit.record("forward", sop=row["sop_uid"], output=output_kind(row["path"]), peer=self.called_ae,
                                 outcome="sent")
                    log.info("forwarded", extra={"event": "forwarded", "output": output_kind(row["path"]),
                                                 "sop": uid_ref(row["sop_uid"]), "peer": self.called_ae})
                else:
                    self._failed(ledger, row, "no response" if code < 0 else f"C-STORE status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        return sent

    def _failed(self, ledger: Ledger, row: dict[str, Any], error: str) -> None:
        metrics.count("forward_failed")
        attempts = int(row["attempts"]) + 1
        if attempts >= self.max_attempts:
            self._dead(ledger, row, error)
            return
        delay = min(MAX_BACKOFF_SECONDS, self.retry_seconds * 2 ** (attempts - 1))
        ledger.forward_failed(row["path"], error, time.time() + delay)
        audit.record("forward", sop=row["sop_uid"], output=output_kind(row["path"]), peer=self.called_ae,
                     outcome="failed", attempt=attempts,
                     error=error.split(":", 1)[0][:120])  # the kind of failure: no message (it may quote a path)
        log.warning("forwarding failed (attempt %d, next in %.0f s): %s", attempts, delay, error,
                    extra={"event": "forward_failed", "sop": uid_ref(row["sop_uid"]), "peer": self.called_ae})

    def _dead(self, ledger: Ledger, row: dict[str, Any], error: str) -> None:
        attempts = int(row["attempts"]) + 1
        ledger.forward_dead_letter(row["path"], error)
        metrics.count("forward_dead_lettered")
        audit.record("forward", sop=row["sop_uid"], output=output_kind(row["path"]), peer=self.called_ae,
                     outcome="dead_letter", attempt=attempts, error=error.split(":", 1)[0][:120])
        log.error("forwarding given up after %d attempt(s): %s; dead-lettered (`lungseg-edge forward list`, "
                  "`lungseg-edge forward retry`)", attempts, error,
                  extra={"event": "forward_dead_letter", "sop": uid_ref(row["sop_uid"]),
                         "output": output_kind(row["path"]), "peer": self.called_ae, "attempts": attempts})

    # --- background ----------------------------------------------------------
    def _run(self) -> None:
        ledger = Ledger(self.state_dir)
        try:
            while not self._stop.wait(1.0):
                try:
                    self.send_due(ledger)
                    self.probe(ledger)
                    if metrics.enabled():
                        metrics.set_forward_queue(pending_count(ledger))
                        metrics.set_dead_letters(ledger.forward_dead_count())
                except Exception:  # the forwarder must never take the service down
                    log.exception("forwarder round failed")
        finally:
            ledger.close()

    def start(self) -> Forwarder:
        self._thread = threading.Thread(target=self._run, name="lungseg-forward", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
