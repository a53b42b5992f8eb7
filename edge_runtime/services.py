"""The optional network services of ``lungseg-edge run``: the metrics endpoint and the DICOM receiver.

Both are off unless configured (``metrics_port``, ``scp_port``). A service that
cannot start (missing package, port in use) raises :class:`ServiceError` with a
message for the log, and the service exits with a configuration error instead
of running half-configured.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lungseg.edge_runtime import metrics
from lungseg.edge_runtime.config import EdgeConfig

log = logging.getLogger("lungseg.edge")


class ServiceError(RuntimeError):
    """A configured service could not start."""


def start_metrics(config: EdgeConfig) -> None:
    """Enable the metrics and serve ``/metrics`` + ``/healthz`` when ``metrics_port`` is set."""
    if config.metrics_port is None:
        return
    try:
        metrics.enable(config.health_stale_seconds)
        host, port = metrics.serve(config.metrics_port, config.metrics_bind)
    except metrics.MetricsUnavailableError as exc:
        raise ServiceError(str(exc)) from exc
    except OSError as exc:
        metrics.disable()
        raise ServiceError(f"metrics: cannot listen on {config.metrics_bind}:{config.metrics_port}: "
                           f"{exc.strerror or exc}") from exc
    log.warning("metrics on http://%s:%d/metrics, health on /healthz", host, port,
                extra={"event": "metrics_config", "port": port})


def watch_queue_probe(tracker: Any):
    """A probe for :func:`metrics.set_queue_probe`: files waiting and the age of the oldest."""
    return lambda: (tracker.pending(), tracker.oldest_wait())


def start_receiver(config: EdgeConfig) -> Any:
    """Start the DICOM Storage SCP into the watch folder when ``scp_port`` is set; returns it (or ``None``)."""
    if config.scp_port is None:
        return None
    from lungseg.edge_runtime.receiver import ReceiverUnavailableError, StorageReceiver

    try:
        receiver = StorageReceiver(Path(config.watch), config.scp_port, config.scp_ae, config.scp_bind,
                                   config.scp_allow)
        receiver.remove_stale_temps()
        receiver.start()
    except ReceiverUnavailableError as exc:
        raise ServiceError(str(exc)) from exc
    return receiver


def stop(receiver: Any) -> None:
    """Stop the receiver (if any) and the metrics endpoint."""
    if receiver is not None:
        receiver.stop()
    metrics.disable()
