"""The optional network services of ``lungseg-edge run``: the metrics endpoint and the DICOM receiver.

Both are off unless configured (``metrics_port``, ``scp_port``). A service that
cannot start (missing package, port in use) raises :class:`ServiceError` with a
message for the log, and the service exits with a configuration error instead
of running half-configured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lungseg.edge_runtime import service_metrics
from lungseg.edge_runtime.config import EdgeConfig
from lungseg.edge_runtime.receiver import ReceiverUnavailableError, StorageReceiver
from lungseg.edge_runtime.retention import ReceivedFiles
from lungseg.edge_runtime.scp_guard import ConnectionGuard
from lungseg.edge_runtime.tls import TlsError, receiver_context
from lungseg.edge_runtime.watcher import ReadyTracker
from lungseg.errors import LungsegError

log = logging.getLogger("lungseg.edge")


class ServiceError(LungsegError, RuntimeError):
    """A configured service could not start."""


def start_metrics(config: EdgeConfig) -> None:
    """Enable the metrics and serve ``/metrics`` + ``/healthz`` when ``metrics_port`` is set.

    The caller stops them with :func:`service_metrics.disable` (a no-op when they never started)."""
    if config.metrics_port is None:
        return
    try:
        service_metrics.enable(config.health_stale_seconds, config.health_fault_seconds)
        host, port = service_metrics.serve(config.metrics_port, config.metrics_bind)
    except service_metrics.MetricsUnavailableError as exc:
        raise ServiceError(str(exc)) from exc
    except OSError as exc:
        service_metrics.disable()
        raise ServiceError(f"metrics: cannot listen on {config.metrics_bind}:{config.metrics_port}: "
                           f"{exc.strerror or exc}") from exc
    log.warning("metrics on http://%s:%d/metrics, health on /healthz", host, port,
                extra={"event": "metrics_config", "port": port})


def watch_queue_probe(tracker: ReadyTracker) -> Callable[[], tuple[int, float]]:
    """A probe for :func:`service_metrics.set_queue_probe`: files waiting and the age of the oldest."""
    return lambda: (tracker.pending(), tracker.oldest_wait())


def start_receiver(config: EdgeConfig, disk_guard: Callable[[], str | None] | None = None,
                   received: ReceivedFiles | None = None) -> StorageReceiver | None:
    """Start the DICOM Storage SCP into the watch folder when ``scp_port`` is set; returns it (or ``None``).

    ``disk_guard`` (the reason free space is low, or ``None``) refuses stores with 0xA700 while it answers;
    ``received`` notes every stored file for retention. The caller stops it (:meth:`StorageReceiver.stop`)."""
    if config.scp_port is None:
        return None
    try:
        receiver = StorageReceiver(config.watch_dir, config.scp_port, config.scp_ae, config.scp_bind,
                                   config.scp_allow)
        receiver.disk_guard, receiver.received = disk_guard, received
        receiver.guard = ConnectionGuard(handshake_seconds=config.scp_handshake_seconds,
                                         association_seconds=config.scp_association_seconds,
                                         per_host=config.scp_max_per_host, max_established=config.scp_max_associations)
        receiver.conflicts_dir = config.quarantine_dir / "receiver-conflicts"  # duplicate UIDs kept aside
        receiver.limits = config.decode_limits()  # max_file_mb, max_pixels, max_frames before 0x0000
        receiver.ssl_context = receiver_context(config)  # DICOM TLS when scp_tls_cert is set
        try:
            receiver.remove_stale_temps()
        except OSError as exc:  # e.g. a temp left in a read-only folder: not a reason to refuse to start
            log.warning("cannot remove a stale receiver temp file (%s)", exc.strerror or exc,
                        extra={"event": "stale_temp_kept"})
        receiver.start()
        if receiver.ssl_context is not None:
            log.warning("DICOM receiver: TLS only, client certificates %s",
                        "required" if config.scp_tls_require_client_cert else
                        "verified when presented" if config.scp_tls_ca else "not requested",
                        extra={"event": "scp_tls"})
    except (ReceiverUnavailableError, TlsError) as exc:
        raise ServiceError(str(exc)) from exc
    return receiver
