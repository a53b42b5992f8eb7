"""The service's Prometheus metrics and a ``/healthz`` endpoint for ``lungseg-edge run`` (optional).

(Not to be confused with :mod:`lungseg.metrics`, the segmentation metrics such as Dice.)

Off by default. :func:`enable` creates the metrics (in a private registry) and
:func:`serve` starts a small HTTP server, bound to 127.0.0.1 unless configured:

* ``GET /metrics``  the Prometheus text format;
* ``GET /healthz``  ``200`` with a JSON body when healthy, ``503`` when work has
  been waiting longer than ``stale_seconds`` and nothing succeeded in that time
  (files to segment, or outputs to deliver; judged separately), when faults of the
  box (an output that cannot be written, no memory, ...) went on for ``fault_seconds``
  with no file processed since the first of them (a clock that retries do not reset),
  when the backend's self-test failed or it was demoted, when outputs were
  dead-lettered, or when a registered source (:func:`add_problem_source`: the disk
  guard, the receiver) reports a problem. Each problem has a short code in the body
  (``reasons``) and in ``lungseg_health_problem{reason=...}``.

The HTTP server is bounded: at most :data:`HTTP_MAX_CONNECTIONS` connections are
open at once (a new one closes the oldest), and a connection that sends nothing for
:data:`HTTP_TIMEOUT_SECONDS` (or is not done after :data:`HTTP_DEADLINE_SECONDS`)
is dropped, so idle sockets hold neither threads nor file descriptors for long.

Everything else in the runtime calls the module-level functions
(:func:`count`, :func:`observe_stage`, :func:`set_backend`, ...). They do nothing
while metrics are disabled or when ``prometheus-client`` (the ``[metrics]``
extra) is not installed, so callers never need to check.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lungseg.errors import LungsegError

log = logging.getLogger("lungseg.edge.metrics")

PREFIX = "lungseg"
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEFAULT_STALE_SECONDS = 600.0
DEFAULT_FAULT_SECONDS = 120.0
HTTP_MAX_CONNECTIONS = 16
HTTP_TIMEOUT_SECONDS = 5.0
HTTP_DEADLINE_SECONDS = 15.0
#: health problem codes (the ``reason`` label of ``lungseg_health_problem``)
HEALTH_REASONS = ("files_stale", "forward_stale", "faults", "selftest_failed", "backend_demoted", "dead_letters",
                  "disk_low", "receiver_refusing", "receiver_saturated", "other")

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
    "faults": ("Faults of the box while processing a file (output not writable, no memory, ...), by code", ("code",)),
    "forward_dead_lettered": ("Outputs given up on after forward_max_attempts or when missing (dead letters)", ()),
    "http_refused": ("HTTP connections to /metrics and /healthz closed at once: too many open", ()),
}


class MetricsUnavailableError(LungsegError, RuntimeError):
    """Metrics were requested but ``prometheus-client`` is not installed."""


class _Metrics:
    """The live metric objects (one private registry per enabled run)."""

    def __init__(self, stale_seconds: float, fault_seconds: float = DEFAULT_FAULT_SECONDS):
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
        self.problem = Gauge(f"{PREFIX}_health_problem", "1 while /healthz reports this problem, by reason",
                             ("reason",), registry=self.registry)
        for reason in HEALTH_REASONS:
            self.problem.labels(reason=reason).set(0)
        self.dead_gauge = Gauge(f"{PREFIX}_forward_dead_letters", "Outputs dead-lettered (not delivered, given up "
                                "on until `lungseg-edge forward retry`)", registry=self.registry)
        self.fault_seconds = float(fault_seconds)
        self.fault_since: float | None = None  # the first fault since the last file processed; retries keep it
        self.fault_code = ""
        self.fault_count = 0
        self.selftest_failed = False
        self.demoted: str | None = None
        self.dead_letters = 0
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
        ok, body = self.health()
        self.healthy.set(1 if ok else 0)
        for reason in HEALTH_REASONS:
            self.problem.labels(reason=reason).set(1 if reason in body["reasons"] else 0)

    def health(self, now: float | None = None) -> tuple[bool, dict[str, Any]]:
        now = time.time() if now is None else now
        waiting_files = self.waiting_files
        problems: list[str] = []
        reasons: list[str] = []

        def problem(reason: str, text: str) -> None:
            problems.append(text)
            if reason not in reasons:
                reasons.append(reason)

        stale = self.stale_seconds
        since_success = now - (self.success_at or self.started)
        if waiting_files and self.oldest_wait > stale and since_success > stale:
            problem("files_stale", f"{waiting_files} file(s) waiting and none processed for {since_success:.0f} s")
        since_forward = now - (self.forward_at or self.started)
        forward_wait = now - self.forward_waiting_since if self.forward_waiting_since is not None else 0.0
        if self.forward_waiting and forward_wait > stale and since_forward > stale:
            problem("forward_stale", f"{self.forward_waiting} output(s) waiting for delivery and none delivered for "
                    f"{since_forward:.0f} s")
        if self.fault_since is not None and now - self.fault_since >= self.fault_seconds:
            problem("faults", f"{self.fault_count} fault(s) of the box ({self.fault_code}, the last) and no file "
                    f"processed for {now - self.fault_since:.0f} s")
        if self.selftest_failed:
            problem("selftest_failed", "the backend's self-test failed")
        if self.demoted:
            problem("backend_demoted", f"the backend was demoted ({self.demoted})")
        if self.dead_letters:
            problem("dead_letters", f"{self.dead_letters} output(s) dead-lettered (see `lungseg-edge forward list`)")
        for source, reason in list(_problem_sources):  # the disk guard (edge_runtime/retention.py), the receiver
            try:
                found = source()
            except Exception:  # a probe must never fail the health check itself
                log.exception("health problem source failed")
                continue
            if found:
                code, sep, _ = found.partition(": ")  # a text may name its own code ("receiver_saturated: ...")
                problem(code if sep and code in HEALTH_REASONS else reason, found)
        body = {"healthy": not problems, "problems": problems, "reasons": reasons, "waiting_files": waiting_files,
                "waiting_outputs": self.forward_waiting, "seconds_since_success": round(since_success, 1),
                "seconds_since_forward": round(since_forward, 1), "stale_seconds": self.stale_seconds,
                "fault_seconds": self.fault_seconds, "dead_letters": self.dead_letters}
        return not problems, body


_state: _Metrics | None = None
_problem_sources: list[tuple[Callable[[], str | None], str]] = []


def add_problem_source(source: Callable[[], str | None], reason: str = "other") -> Callable[[], None]:
    """``/healthz`` also reports ``source()``'s problem (a text, or ``None``) under ``reason`` (one of
    :data:`HEALTH_REASONS`; a text that starts with another of them, ``"code: ..."``, is reported under that
    one); returns what removes it."""
    entry = (source, reason if reason in HEALTH_REASONS else "other")
    _problem_sources.append(entry)
    return lambda: _problem_sources.remove(entry) if entry in _problem_sources else None
_server: _BoundedHTTPServer | None = None


def available() -> bool:
    """Whether ``prometheus-client`` can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def enabled() -> bool:
    return _state is not None


def enable(stale_seconds: float = DEFAULT_STALE_SECONDS, fault_seconds: float = DEFAULT_FAULT_SECONDS) -> None:
    """Create the metrics (replacing any from an earlier run in this process)."""
    global _state
    if not available():
        raise MetricsUnavailableError("metrics need prometheus-client (pip install 'lungseg[metrics]')")
    _state = _Metrics(stale_seconds, fault_seconds)


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
    state.selftest_failed = selftest is False


def backend_demoted(reason: str) -> None:
    """The backend was demoted (``from -> to``): unhealthy until the service restarts."""
    if _state is not None:
        _state.demoted = str(reason)[:200]


def fault(code: str) -> None:
    """A fault of the box on one file (retried later). The fault clock starts at the first fault since the last
    file processed; retries do not reset it."""
    state = _state
    if state is None:
        return
    if state.fault_since is None:
        state.fault_since = time.time()
    state.fault_code = str(code)
    state.fault_count += 1
    state.counters["faults"].labels(code=str(code)).inc()


def set_dead_letters(count_: int) -> None:
    """How many outputs are dead-lettered (the forwarder calls this after every round)."""
    state = _state
    if state is not None:
        state.dead_letters = int(count_)
        state.dead_gauge.set(count_)


def processed_ok() -> None:
    """A file was processed: the last-success time is now."""
    state = _state
    if state is not None:
        state.success_at = time.time()
        state.last_success.set(state.success_at)
        state.fault_since, state.fault_count = None, 0


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


def set_drift(comparisons: Mapping[tuple[str, str], Any]) -> None:
    """Publish the drift monitor's comparisons, ``(reference, window) -> Comparison | None``
    (:mod:`lungseg.edge_runtime.drift_monitor`); labels are bounded: 2 references x 2 windows x the descriptors."""
    state = _state
    if state is None:
        return
    from prometheus_client import Gauge

    with state.lock:
        gauges = getattr(state, "drift_gauges", None)
        if gauges is None:
            labels = ("reference", "window")
            gauges = state.drift_gauges = (  # type: ignore[attr-defined]
                Gauge(f"{PREFIX}_drift_score", "Drift: combined score of the window against the reference "
                      "(alarm at >= 1; -1 while not enough images)", labels, registry=state.registry),
                Gauge(f"{PREFIX}_drift_psi", "Drift: population stability index of one descriptor",
                      ("descriptor", *labels), registry=state.registry),
                Gauge(f"{PREFIX}_drift_window_images", "Drift: images in the window", labels,
                      registry=state.registry))
    score, psi, images = gauges
    for (reference, window), comparison in comparisons.items():
        score.labels(reference=reference, window=window).set(-1 if comparison is None else comparison.score)
        images.labels(reference=reference, window=window).set(0 if comparison is None else comparison.n)
        for descriptor, value in ({} if comparison is None else comparison.psi).items():
            psi.labels(descriptor=descriptor, reference=reference, window=window).set(value)


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
    timeout = HTTP_TIMEOUT_SECONDS  # socket timeout: a silent or dripping client is dropped

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


def _shut(request: socket.socket) -> None:
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, but at most ``max_connections`` at once.

    When all are taken, the oldest connection is closed to make room for the new one: idle or
    dripping sockets cannot lock a scraper (or the health check) out, and never hold more than
    ``max_connections`` threads and descriptors."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], max_connections: int = HTTP_MAX_CONNECTIONS):
        self.closing = threading.Event()  # first: a failed bind calls server_close() from super().__init__
        super().__init__(address, _Handler)
        self.slots = threading.BoundedSemaphore(max_connections)
        self.open: dict[socket.socket, float] = {}  # oldest first
        self.open_lock = threading.Lock()
        threading.Thread(target=self._reap, name="lungseg-metrics-reaper", daemon=True).start()

    def _reap(self) -> None:
        """One thread for every connection's deadline: a client dripping a byte per timeout cannot keep its slot."""
        while not self.closing.wait(1.0):
            limit = time.monotonic() - HTTP_DEADLINE_SECONDS
            with self.open_lock:
                late = [request for request, opened in self.open.items() if opened < limit]
            for request in late:
                _shut(request)

    def server_close(self) -> None:
        self.closing.set()
        super().server_close()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            with self.open_lock:
                oldest = next(iter(self.open), None)
            if oldest is not None:
                count("http_refused")  # the oldest connection is dropped for this one
                _shut(oldest)
            if not self.slots.acquire(timeout=1.0):
                count("http_refused")
                self.shutdown_request(request)
                return
        with self.open_lock:
            self.open[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def _release(self, request: socket.socket) -> None:
        with self.open_lock:
            self.open.pop(request, None)
        self.slots.release()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def get_request(self) -> tuple[socket.socket, Any]:
        request, address = super().get_request()
        request.settimeout(HTTP_TIMEOUT_SECONDS)
        return request, address


def serve(port: int, bind: str = "127.0.0.1") -> tuple[str, int]:
    """Serve ``/metrics`` and ``/healthz`` in a background thread; returns the bound (host, port).

    Raises :class:`OSError` when the address cannot be bound."""
    global _server
    if _state is None:
        raise RuntimeError("metrics.enable() first")
    server = _BoundedHTTPServer((bind, int(port)))
    threading.Thread(target=server.serve_forever, name="lungseg-metrics", daemon=True).start()
    _server = server
    host, bound_port = server.server_address[:2]
    return str(host), int(bound_port)
