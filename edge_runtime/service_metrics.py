"""The service's Prometheus metrics and a ``/healthz`` endpoint for ``lungseg-edge run`` (optional).

(Not to be confused with :mod:`lungseg.metrics`, the segmentation metrics such as Dice.)

Off by default. :func:`enable` creates the metrics (in a private registry) and
:func:`serve` starts a small HTTP server, bound to 127.0.0.1 unless configured:

* ``GET /metrics``  the Prometheus text format;
* ``GET /healthz``  ``200`` with a JSON body when healthy, ``503`` when work has
  been waiting longer than ``stale_seconds`` and nothing succeeded in that time
  (files to segment, or outputs to deliver; judged separately).

Everything else in the runtime calls the module-level functions
(:func:`count`, :func:`observe_stage`, :func:`set_backend`, ...). They do nothing
while metrics are disabled or when ``prometheus-client`` (the ``[metrics]``
extra) is not installed, so callers never need to check.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lungseg.errors import LungsegError

log = logging.getLogger("lungseg.edge.metrics")

PREFIX = "lungseg"
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEFAULT_STALE_SECONDS = 600.0

#: counter name -> (help, label names)
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "received": ("DICOM instances received by the Storage SCP and written to the watch folder", ()),
    "refused": ("DICOM C-STORE requests or associations the Storage SCP refused, by reason", ("reason",)),
    "processed": ("Input files segmented, with outputs written", ()),
    "duplicates": ("Input files skipped as duplicates of an instance already processed", ()),
    "quarantined": ("Input files quarantined, by reason code", ("reason",)),
    "flagged": ("QA flags raised on processed files, by flag", ("flag",)),
    "flagged_files": ("Processed files with at least one QA flag", ()),
    "forwarded": ("Outputs delivered by C-STORE, by kind (sc, seg)", ("kind",)),
    "forward_failed": ("C-STORE delivery attempts that failed (each is retried later)", ()),
    "backend_demotions": ("Inference backend demotions after errors, from backend to backend", ("backend", "to")),
}


class MetricsUnavailableError(LungsegError, RuntimeError):
    """Metrics were requested but ``prometheus-client`` is not installed."""


class _Metrics:
    """The live metric objects (one private registry per enabled run)."""

    def __init__(self, stale_seconds: float):
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            Info,
            PlatformCollector,
            ProcessCollector,
        )

        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.stale_seconds = float(stale_seconds)
        self.started = time.time()
        self.lock = threading.Lock()
        self.counters = {name: Counter(f"{PREFIX}_{name}", text, labels, registry=self.registry)
                         for name, (text, labels) in COUNTERS.items()}
        self.stage = Histogram(f"{PREFIX}_stage_seconds", "Time per file and pipeline stage", ("stage",),
                               buckets=STAGE_BUCKETS, registry=self.registry)
        self.backend = Info(f"{PREFIX}_backend", "Inference backend and precision in use", registry=self.registry)
        self.selftest = Gauge(f"{PREFIX}_selftest_ok", "Backend self-test result: 1 passed, 0 failed, -1 not run",
                              registry=self.registry)
        self.selftest.set(-1)
        self.watch_depth = Gauge(f"{PREFIX}_queue_files", "Files waiting in the watch folder", registry=self.registry)
        self.watch_oldest = Gauge(f"{PREFIX}_queue_oldest_seconds", "Age of the oldest file waiting in the watch "
                                  "folder (0 when none)", registry=self.registry)
        self.forward_depth = Gauge(f"{PREFIX}_forward_queue_outputs", "Outputs waiting for C-STORE delivery",
                                   registry=self.registry)
        self.last_success = Gauge(f"{PREFIX}_last_success_timestamp_seconds", "Unix time of the last file "
                                  "processed", registry=self.registry)
        self.last_forward = Gauge(f"{PREFIX}_last_forward_timestamp_seconds", "Unix time of the last output "
                                  "delivered", registry=self.registry)
        self.healthy = Gauge(f"{PREFIX}_healthy", "1 when /healthz reports healthy", registry=self.registry)
        Gauge(f"{PREFIX}_start_timestamp_seconds", "Unix time the service started",
              registry=self.registry).set(self.started)
        self.queue_probe: Callable[[], tuple[int, float]] | None = None
        self.waiting_files = 0
        self.oldest_wait = 0.0
        self.forward_waiting = 0
        self.forward_waiting_since: float | None = None
        self.success_at: float | None = None
        self.forward_at: float | None = None

    def refresh(self) -> None:
        probe = self.queue_probe
        if probe is not None:
            try:
                depth, oldest = probe()
            except Exception:  # a scrape must never fail because of a probe
                log.exception("queue probe failed")
            else:
                self.waiting_files, self.oldest_wait = int(depth), float(oldest)
                self.watch_depth.set(depth)
                self.watch_oldest.set(oldest)
        self.healthy.set(1 if self.health()[0] else 0)

    def health(self, now: float | None = None) -> tuple[bool, dict[str, Any]]:
        now = time.time() if now is None else now
        waiting_files = self.waiting_files
        problems = []
        stale = self.stale_seconds
        since_success = now - (self.success_at or self.started)
        if waiting_files and self.oldest_wait > stale and since_success > stale:
            problems.append(f"{waiting_files} file(s) waiting and none processed for {since_success:.0f} s")
        since_forward = now - (self.forward_at or self.started)
        forward_wait = now - self.forward_waiting_since if self.forward_waiting_since is not None else 0.0
        if self.forward_waiting and forward_wait > stale and since_forward > stale:
            problems.append(f"{self.forward_waiting} output(s) waiting for delivery and none delivered for "
                            f"{since_forward:.0f} s")
        body = {"healthy": not problems, "problems": problems, "waiting_files": waiting_files,
                "waiting_outputs": self.forward_waiting, "seconds_since_success": round(since_success, 1),
                "seconds_since_forward": round(since_forward, 1), "stale_seconds": self.stale_seconds}
        return not problems, body


_state: _Metrics | None = None
_server: ThreadingHTTPServer | None = None


def available() -> bool:
    """Whether ``prometheus-client`` can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def enabled() -> bool:
    return _state is not None


def enable(stale_seconds: float = DEFAULT_STALE_SECONDS) -> None:
    """Create the metrics (replacing any from an earlier run in this process)."""
    global _state
    if not available():
        raise MetricsUnavailableError("metrics need prometheus-client (pip install 'lungseg[metrics]')")
    _state = _Metrics(stale_seconds)


def disable() -> None:
    """Stop the HTTP server and drop the metrics; every call is a no-op again."""
    global _state, _server
    if _server is not None:
        _server.shutdown()
        _server.server_close()
        _server = None
    _state = None


# --- the API the runtime calls (no-ops when disabled) ----------------------------
def count(name: str, amount: float = 1.0, **labels: str) -> None:
    """Increment the counter ``name`` (one of :data:`COUNTERS`) with its labels."""
    state = _state
    if state is None:
        return
    counter = state.counters[name]
    (counter.labels(**labels) if labels else counter).inc(amount)


def observe_stage(stage: str, seconds: float) -> None:
    """Record how long one file spent in ``stage`` (decode, inference, write, forward, ...)."""
    if _state is not None:
        _state.stage.labels(stage=stage).observe(max(0.0, float(seconds)))


def set_backend(backend: str, precision: str, selftest: bool | None = None) -> None:
    """Publish the backend and precision in use and, when known, its self-test result."""
    state = _state
    if state is None:
        return
    state.backend.info({"backend": str(backend), "precision": str(precision)})
    state.selftest.set(-1 if selftest is None else int(bool(selftest)))


def processed_ok() -> None:
    """A file was processed: the last-success time is now."""
    state = _state
    if state is not None:
        state.success_at = time.time()
        state.last_success.set(state.success_at)


def forwarded_ok() -> None:
    """An output was delivered: the last-delivery time is now."""
    state = _state
    if state is not None:
        state.forward_at = time.time()
        state.last_forward.set(state.forward_at)


def set_forward_queue(waiting: int) -> None:
    """How many outputs wait for delivery (the forwarder calls this after every round)."""
    state = _state
    if state is not None:
        if waiting and not state.forward_waiting:
            state.forward_waiting_since = time.time()
        elif not waiting:
            state.forward_waiting_since = None
        state.forward_waiting = int(waiting)
        state.forward_depth.set(waiting)


def set_queue_probe(probe: Callable[[], tuple[int, float]] | None) -> None:
    """``probe()`` -> (files waiting, age in seconds of the oldest); read at every scrape."""
    if _state is not None:
        _state.queue_probe = probe


def render() -> bytes | None:
    """The current metrics in the Prometheus text format (``None`` when disabled)."""
    state = _state
    if state is None:
        return None
    from prometheus_client import generate_latest

    with state.lock:
        state.refresh()
        return generate_latest(state.registry)


def health() -> tuple[bool, dict[str, Any]]:
    """(healthy, details) as served by ``/healthz``; always healthy while disabled."""
    state = _state
    if state is None:
        return True, {"healthy": True, "metrics": "disabled"}
    with state.lock:
        state.refresh()
        return state.health()


# --- HTTP -------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server_version = "lungseg-edge"

    def do_GET(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST

        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, status, ctype = render() or b"", 200, CONTENT_TYPE_LATEST
        elif path == "/healthz":
            ok, details = health()
            body, status, ctype = (json.dumps(details) + "\n").encode(), 200 if ok else 503, "application/json"
        else:
            body, status, ctype = b"not found: try /metrics or /healthz\n", 404, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


def serve(port: int, bind: str = "127.0.0.1") -> tuple[str, int]:
    """Serve ``/metrics`` and ``/healthz`` in a background thread; returns the bound (host, port).

    Raises :class:`OSError` when the address cannot be bound."""
    global _server
    if _state is None:
        raise RuntimeError("metrics.enable() first")
    server = ThreadingHTTPServer((bind, int(port)), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="lungseg-metrics", daemon=True).start()
    _server = server
    host, bound_port = server.server_address[:2]
    return str(host), int(bound_port)
