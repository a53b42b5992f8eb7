"""``lungseg-edge run``: the service loop.

Start-up: lock the state and output folders, remove temp files a killed run left
behind, open the ledger, start the metrics endpoint, load the model and choose the
backend (logged, with the reason for every fallback), start forwarding, watching
and the receiver, queue the files already in the folder, then tell systemd READY=1.
The loop hands batches of complete files to the
:class:`~lungseg.edge_runtime.pipeline.Processor` and pings the systemd watchdog.

Stopping: the first SIGTERM/SIGINT lets the file being written finish (its
outputs are complete or absent, never partial) and abandons the rest of the
batch, which stays unrecorded and is processed after the next start. If the
current file is not done within ``STOP_GRACE_SECONDS`` (or on a second signal)
it is abandoned too: its temp files are removed and nothing is recorded.

Every resource taken at start-up (locks, ledger, crash log, metrics endpoint,
forwarder, decode worker, observer, receiver) is registered in one
:class:`contextlib.ExitStack` as it is taken, and released in reverse order
however the run ends; the signal handlers are restored, and systemd told
STOPPING, before anything else is released.
"""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import faulthandler
import functools
import hashlib
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lungseg.atomic import atomic_write
from lungseg.bundle import Bundle, ModelNotFoundError, resolve_bundle
from lungseg.dicom_decode import value_validation_off
from lungseg.edge_runtime import audit, drift_monitor, service_metrics, services
from lungseg.edge_runtime.admission import UNEXPLAINED_DEATHS, Outcome
from lungseg.edge_runtime.backend_status import backend_options
from lungseg.edge_runtime.codes import Status
from lungseg.edge_runtime.config import EdgeConfig
from lungseg.edge_runtime.decoding import keep_freed_memory
from lungseg.edge_runtime.forward import Forwarder, ForwardUnavailableError
from lungseg.edge_runtime.fsio import remove_stale_temps
from lungseg.edge_runtime.ledger import Ledger, LedgerLockedError, OutputLock, StateLock
from lungseg.edge_runtime.pipeline import Processor
from lungseg.edge_runtime.retention import DiskGuard, ReceivedFiles, Retention
from lungseg.edge_runtime.sdnotify import Notifier
from lungseg.edge_runtime.tls import TlsError, forward_tls_args
from lungseg.edge_runtime.watcher import ReadyTracker, make_observer
from lungseg.errors import LungsegError
from lungseg.predictors import BackendUnavailableError, Selection, select_predictor

if TYPE_CHECKING:  # for annotations only: --once never starts an observer, so never loads watchdog
    from watchdog.observers.api import BaseObserver

log = logging.getLogger("lungseg.edge")

EXIT_OK = 0
EXIT_QUARANTINED = 1
EXIT_USAGE = 2
EXIT_NO_MODEL = 3
EXIT_BACKEND = 4
EXIT_STATE = 5
EXIT_UNDONE = 6
EXIT_INTERNAL = 70

STOP_GRACE_SECONDS = 7.0
TICK_SECONDS = 0.2
WATCH_CHECK_SECONDS = 1.0
ONCE_RETRIES = 2  # --once: short retries of a transient fault (memory, disk) before leaving the file undone
CRASH_LOG = "crash.log"
RETENTION_INTERVAL_SECONDS = 3600.0
FREE_SPACE_SWEEP_SECONDS = 60.0  # the sweep's interval while below retention_min_free_mb
UNDONE = "undone"  # files a --once run leaves for the next run (a total, not an outcome status)

_T = TypeVar("_T")


class _Signals:
    """SIGTERM/SIGINT -> stop flag; a second signal or the grace timer abandons the current file."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.previous: dict[int, Any] = {}  # the handlers replaced (functions, SIG_DFL, SIG_IGN or None)
        self.timer: threading.Timer | None = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        log.warning("%s received: finishing the current file, then stopping", signal.Signals(signum).name,
                    extra={"event": "stopping"})
        self.timer = threading.Timer(STOP_GRACE_SECONDS, _thread.interrupt_main)
        self.timer.daemon = True
        self.timer.start()

    def install(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> _Signals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


def run(config: EdgeConfig, stop: threading.Event | None = None) -> int:
    """Run the watcher until stopped (or, with ``once``, until the folder is done). Returns an exit code."""
    with value_validation_off():  # pydicom's messages are silenced here: its value checks only cost time
        return _run(config, stop)


class StartupError(LungsegError):
    """The service cannot start; ``code`` is its exit code (the reason is logged already)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _run(config: EdgeConfig, stop: threading.Event | None) -> int:
    keep_freed_memory(32 << 20, 64 << 20)  # file bytes and pixel arrays: reuse, don't re-fault, per file
    config = _resolved(config)
    if not config.watch_dir.is_dir():
        log.error("watch folder %s does not exist or is not a folder", config.watch)
        return EXIT_USAGE
    stop = stop or threading.Event()
    try:
        _check_root(config)
    except StartupError as exc:
        return exc.code
    # Everything acquired is released in reverse order when this block ends, however it ends; the signal
    # handlers are restored and systemd is told STOPPING first (``first_out`` is left before ``resources``).
    with contextlib.ExitStack() as resources, contextlib.ExitStack() as first_out:
        try:
            _lock_folders(config, resources)
        except StartupError as exc:
            return exc.code
        notifier = Notifier()
        first_out.callback(notifier.stopping)
        first_out.enter_context(_Signals(stop))
        try:
            return _serve(config, stop, notifier, resources)
        except StartupError as exc:
            return exc.code
        except KeyboardInterrupt:
            if stop.is_set():
                log.warning("stop: abandoned the file in progress (it will be processed after the next start)",
                            extra={"event": "abandoned"})
                return EXIT_UNDONE if config.once else EXIT_OK
            raise


def _resolved(config: EdgeConfig) -> EdgeConfig:
    """Every path resolved once, here: a relative or ``..`` path means the same folder everywhere."""
    return dataclasses.replace(
        config, watch=config.watch_dir.resolve(), out=config.out_dir.resolve(),
        state=Path(config.state).resolve() if config.state is not None else None)


def _lock_folders(config: EdgeConfig, resources: contextlib.ExitStack) -> None:
    """Create the output and state folders and hold both locks (another daemon using either: ``EXIT_STATE``)."""
    out, state = config.out_dir, config.state_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        state.mkdir(parents=True, exist_ok=True)
        _make_private(state, config.quarantine_dir)
        resources.callback(StateLock(state).acquire().release)
        resources.callback(OutputLock(out).acquire().release)
    except LedgerLockedError as exc:
        log.error("%s", exc)
        raise StartupError(EXIT_STATE) from exc
    except OSError as exc:
        log.error("cannot use the output/state folders: %s", exc)
        raise StartupError(EXIT_STATE) from exc


def _make_private(*folders: Path) -> None:
    """Mode 0700 for the state and quarantine folders (ledger, audit, full PHI copies), whatever the umask."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if folder.stat().st_uid == os.geteuid() and folder.stat().st_mode & 0o077:
                folder.chmod(0o700)
        except OSError as exc:  # e.g. a read-only folder: the start goes on, the next write fault is reported
            log.warning("cannot make %s private (%s)", folder, exc.strerror or exc, extra={"event": "not_private"})


def _check_root(config: EdgeConfig) -> None:
    """``run_as_root``: a warning (default) or a refusal when started as root."""
    if os.geteuid() != 0 or config.run_as_root == "allow":
        return
    if config.run_as_root == "refuse":
        log.error("refusing to run as root (run_as_root = \"refuse\"): run as a service user, see INSTALL.md",
                  extra={"event": "root_refused"})
        raise StartupError(EXIT_USAGE)
    log.warning("running as root: a service user is safer (see INSTALL.md; run_as_root = \"allow\" hides this)",
                extra={"event": "root_warning"})


def _serve(config: EdgeConfig, stop: threading.Event, notifier: Notifier, resources: contextlib.ExitStack) -> int:
    """Start everything (each part registered in ``resources`` for its teardown), then run the loop."""
    ledger = _open_ledger(config, resources)
    if config.audit:
        try:
            audit.open_trail(config.state_dir, config.audit_uids, config.audit_max_mb << 20)
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot open the audit trail in %s (%s): check it with `lungseg-edge audit verify`, move a "
                      "damaged file aside (or set audit = false)", config.state_dir / audit.FOLDER, exc,
                      extra={"event": "audit_failed"})
            raise StartupError(EXIT_STATE) from exc
        resources.callback(audit.close_trail)
    resources.callback(service_metrics.disable)
    _start_service(services.start_metrics, config)
    disk = DiskGuard([config.watch_dir, config.out_dir, config.state_dir], config.disk_min_free_mb,
                     config.disk_min_free_percent)
    resources.callback(service_metrics.add_problem_source(disk.check, "disk_low"))
    bundle, selection = _load_model(config)
    if config.drift:  # the drift monitor (issue 23): off, said once, when the bundle has no reference
        drift_monitor.start(bundle.root, config.state_dir, config.drift_window, config.drift_site_after)
        resources.callback(drift_monitor.stop)
    forwarder = _make_forwarder(config, resources)
    service_metrics.set_backend(selection.predictor.backend, selection.predictor.precision)  # the Processor may refine
    processor = Processor(config, selection.predictor, bundle, ledger, stop, selection.fallbacks)
    resources.callback(processor.close)
    _log_ready(config, processor, selection)
    _audit_start(config, processor)
    hasher = audit.Hasher(config.state_dir, config.audit_uids)
    received = ReceivedFiles(config.state_dir, hasher)
    processor.admission.own = received  # the receiver's files are moved into quarantine, not copied
    retention = Retention(config, ledger, received, hasher)
    tracker = _make_tracker(config)
    observer = _WatchGuard(config, tracker)
    resources.callback(observer.stop)
    if not config.once:
        observer.start()
    service_metrics.set_queue_probe(services.watch_queue_probe(tracker))
    receiver = _start_service(functools.partial(services.start_receiver, disk_guard=disk.check, received=received),
                              config)
    if receiver is not None:
        resources.callback(receiver.stop)
        resources.callback(service_metrics.add_problem_source(receiver.problem))  # receiver_refusing/_saturated
    found = tracker.scan()
    log.info("%d file(s) already in the watch folder", found, extra={"event": "scan", "files": found})
    notifier.ready(f"watching, {found} file(s) queued at start")
    code = _loop(config, processor, tracker, notifier, stop, observer, disk, retention)
    if forwarder is not None and config.once and not stop.is_set():
        forwarder.send_due(ledger, limit=10_000)  # one attempt for everything queued
    return code


def _open_ledger(config: EdgeConfig, resources: contextlib.ExitStack) -> Ledger:
    """Remove temp files a killed run left, open (or rebuild) the ledger, and record fatal signals."""
    out, state = config.out_dir, config.state_dir
    removed = remove_stale_temps(out) + remove_stale_temps(config.quarantine_dir)
    if removed:
        log.warning("removed %d temp file(s) left by an interrupted run", removed)
    try:
        ledger = Ledger.open_or_rebuild(state, out, config.quarantine_dir)
    except sqlite3.Error as exc:
        log.error("cannot open the ledger in %s: %s", state, exc)
        raise StartupError(EXIT_STATE) from exc
    resources.callback(ledger.close)
    resources.callback(_watch_for_crashes(state, ledger))
    return ledger


def _start_service(start: Callable[[EdgeConfig], _T], config: EdgeConfig) -> _T:
    """``start(config)``; a configured service that cannot start is a configuration error."""
    try:
        return start(config)
    except services.ServiceError as exc:
        log.error("%s", exc)
        raise StartupError(EXIT_USAGE) from exc


def _load_model(config: EdgeConfig) -> tuple[Bundle, Selection]:
    try:
        bundle = resolve_bundle(config.model)
    except ModelNotFoundError as exc:
        log.error("no usable model: %s", exc, extra={"event": "no_model"})
        raise StartupError(EXIT_NO_MODEL) from exc
    try:
        # engines are cached and parity-checked in <state>/engines, never in the (read-only) bundle
        selection = select_predictor(bundle, config.backend, config.threads, backend_options(config))
    except BackendUnavailableError as exc:
        log.error("backend %s unavailable: %s", config.backend, exc, extra={"event": "backend_unavailable"})
        raise StartupError(EXIT_BACKEND) from exc
    for reason in selection.fallbacks:
        log.warning("fallback: %s", reason, extra={"event": "backend_fallback"})
    return bundle, selection


def _make_forwarder(config: EdgeConfig, resources: contextlib.ExitStack) -> Forwarder | None:
    """The C-STORE forwarder when ``forward_host`` is set (started now unless ``once``: then one round at the end)."""
    if not config.forward_host:
        return None
    try:
        forwarder = Forwarder(config.out_dir, config.state_dir, config.forward_host, config.forward_port,
                              config.forward_ae, config.forward_calling_ae, config.forward_retry_seconds,
                              config.forward_max_attempts)
        forwarder.tls_args = forward_tls_args(config)  # DICOM TLS when forward_tls is on
    except (ForwardUnavailableError, TlsError) as exc:
        log.error("%s", exc)
        raise StartupError(EXIT_USAGE) from exc
    resources.callback(forwarder.stop)
    log.warning("forwarding outputs to %s@%s:%d%s", config.forward_ae, config.forward_host,
                config.forward_port, " over TLS" if forwarder.tls_args else "", extra={"event": "forward_config"})
    if not config.once:
        forwarder.start()
    return forwarder


def _log_ready(config: EdgeConfig, processor: Processor, selection: Selection) -> None:
    prov = processor.provenance
    log.warning(
        "lungseg-edge %s ready: backend %s (%s), model %s %s sha256 %s, watching %s (%s)%s",
        prov.software_version, prov.backend, prov.precision, prov.model_name, prov.model_version,
        prov.model_sha256[:16], config.watch, "once" if config.once else ("polling" if config.polling else "inotify"),
        "; fallbacks: " + "; ".join(selection.fallbacks) if selection.fallbacks else "",
        extra={"event": "startup", "backend": prov.backend, "precision": prov.precision,
               "fallbacks": selection.fallbacks, "model": prov.model_name, "model_version": prov.model_version,
               "seg": config.seg, "batch_size": config.batch_size},
    )


def _audit_start(config: EdgeConfig, processor: Processor) -> None:
    """Audit the start, and a configuration or model change since the last start (``<state>/audit/last-start.json``)."""
    if not audit.enabled():
        return
    prov = processor.provenance
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}
    current = {"config_sha256": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest(),
               "bundle_sha256": prov.bundle_sha256, "model_version": f"{prov.model_name} {prov.model_version}"}
    marker = config.state_dir / audit.FOLDER / "last-start.json"
    previous: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads(marker.read_text())
    audit.record("start", software_version=prov.software_version, backend=prov.backend, precision=prov.precision,
                 **current)
    if previous and previous.get("config_sha256") != current["config_sha256"]:
        audit.record("config_change", previous=previous.get("config_sha256"), config_sha256=current["config_sha256"])
    if previous and (previous.get("bundle_sha256"), previous.get("model_version")) != \
            (current["bundle_sha256"], current["model_version"]):
        audit.record("model_change", previous=previous.get("model_version"),
                     previous_bundle_sha256=previous.get("bundle_sha256"),
                     model_version=current["model_version"], bundle_sha256=current["bundle_sha256"])
    with contextlib.suppress(OSError):
        atomic_write(marker, json.dumps(current))


def _make_tracker(config: EdgeConfig) -> ReadyTracker:
    excluded = [config.out_dir, config.state_dir, config.quarantine_dir]
    return ReadyTracker(
        root=config.watch_dir, inotify=not (config.polling or config.once),
        stable_seconds=config.stable_seconds, settle_seconds=config.settle_seconds,
        ignore=config.ignore, excluded=excluded, recursive=config.recursive,
    )


class _WatchGuard:
    """The file-system observer, restarted when the watch folder is deleted and created again.

    inotify watches an inode: a folder removed and recreated under the same name is
    silently no longer watched. Once a second the folder's identity is checked; a
    missing folder is logged (once), a new one gets a new observer and a full scan.
    """

    def __init__(self, config: EdgeConfig, tracker: ReadyTracker):
        self.config = config
        self.tracker = tracker
        self.observer: BaseObserver | None = None
        self.identity = self._identity()
        self.missing = False
        self.next_check = 0.0

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.config.watch_dir)
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if os.path.isdir(self.config.watch_dir) else None

    def start(self) -> None:
        self.observer = make_observer(self.tracker, self.config.polling, self.config.poll_interval)
        self.observer.start()

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=3)
            self.observer = None

    def check(self) -> None:
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + WATCH_CHECK_SECONDS
        identity = self._identity()
        if identity is None:
            if not self.missing:
                log.error("the watch folder %s disappeared; waiting for it to come back", self.config.watch,
                          extra={"event": "watch_missing"})
                self.missing = True
            return
        if identity == self.identity and not self.missing:
            return
        log.warning("the watch folder %s is back (or was replaced): watching it again", self.config.watch,
                    extra={"event": "watch_restored"})
        self.identity, self.missing = identity, False
        if self.observer is not None or not self.config.once:
            self.stop()
            try:
                self.start()
            except OSError as exc:
                log.error("cannot watch %s yet (%s)", self.config.watch, exc.strerror, extra={"event": "watch_missing"})
                self.missing = True
                return
        self.tracker.scan()


def _watch_for_crashes(state: Path, ledger: Ledger) -> Callable[[], None]:
    """Record fatal signals in ``<state>/crash.log``; after one, blame the content that was in progress.

    Returns what stops recording them."""
    path = Path(state) / CRASH_LOG
    try:
        crashed = path.is_file() and path.stat().st_size > 0
        suspects = ledger.account_unfinished(crashed)
        if crashed:
            aside = path.with_name(f"{CRASH_LOG}.{int(time.time())}")
            os.replace(path, aside)
            log.critical("the previous run died of a fatal signal (see %s); %d file(s) were in progress: each is "
                         "processed alone now, and quarantined if it was alone then", aside.name, suspects,
                         extra={"event": "crash_detected", "suspects": suspects})
        elif suspects:
            log.warning("the previous run stopped abnormally with %d file(s) in progress; each is processed alone "
                        "(%d such stops while alone quarantine a file)", suspects, UNEXPLAINED_DEATHS,
                        extra={"event": "unfinished_attempts", "suspects": suspects})
        if faulthandler.is_enabled():  # someone (a test runner) already reports fatal signals
            return lambda: None
        handle = path.open("a")
    except OSError as exc:
        log.warning("no crash log (%s)", exc.strerror)
        return lambda: None
    faulthandler.enable(file=handle, all_threads=True)

    def close() -> None:
        faulthandler.disable()
        handle.close()

    return close


def _loop(config: EdgeConfig, processor: Processor, tracker: ReadyTracker, notifier: Notifier,
          stop: threading.Event, guard: _WatchGuard | None = None, disk: DiskGuard | None = None,
          retention: Retention | None = None) -> int:
    totals = {str(status): 0 for status in (Status.DONE, Status.DUPLICATE, Status.QUARANTINED, Status.SEEN,
                                            Status.SKIPPED)}
    totals.update({UNDONE: 0, str(Status.ABANDONED): 0})
    next_rescan = time.monotonic() + config.rescan_seconds
    once_retries: dict[Path, int] = {}
    next_sweep = 0.0
    while not stop.is_set():
        notifier.ping()
        if guard is not None:
            guard.check()
        if retention is not None and retention.active and time.monotonic() >= next_sweep:
            # hourly; every minute while free-space retention has something to do
            next_sweep = time.monotonic() + (FREE_SPACE_SWEEP_SECONDS if retention.short_of_space()
                                             else RETENTION_INTERVAL_SECONDS)
            try:
                retention.sweep()
            except (OSError, sqlite3.Error) as exc:
                log.error("retention sweep failed (%s)", exc, extra={"event": "retention_failed"})
        if disk is not None and disk.check():  # low on space: the files wait in the folder, none is lost
            if config.once:
                break
            stop.wait(TICK_SECONDS)
            continue
        batch = tracker.take_ready(limit=config.batch_size)
        if batch:
            for outcome in processor.process(batch):
                _tally(config, outcome, totals, once_retries, tracker)
            notifier.status("processed {done}, duplicates {duplicate}, quarantined {quarantined}; "
                            "{pending} pending".format(pending=tracker.pending(), **totals))
            continue
        if config.once and tracker.pending() == 0:
            break
        if not config.once and config.rescan_seconds > 0 and time.monotonic() >= next_rescan:
            tracker.scan()  # safety net for events lost (inotify queue overflow, network shares)
            next_rescan = time.monotonic() + config.rescan_seconds
        stop.wait(TICK_SECONDS)
    return _finish(config, totals, tracker)


def _tally(config: EdgeConfig, outcome: Outcome, totals: dict[str, int], once_retries: dict[Path, int],
           tracker: ReadyTracker) -> None:
    """Count one outcome; a retry is queued again (with ``--once``, a fault of the box only a few times)."""
    if outcome.status in totals:
        totals[outcome.status] += 1
    elif outcome.status == Status.RETRY and outcome.path is not None:
        if not (config.once and outcome.transient):  # the service just retries; nothing to count
            tracker.seen(outcome.path, delay=outcome.retry_after)
            return
        tries = once_retries[outcome.path] = once_retries.get(outcome.path, 0) + 1
        if tries > ONCE_RETRIES:
            totals[UNDONE] += 1  # a lasting fault of the box: the next run tries again
        else:
            tracker.seen(outcome.path, delay=min(outcome.retry_after, 1.0 * tries))


def _finish(config: EdgeConfig, totals: dict[str, int], tracker: ReadyTracker) -> int:
    """Log the totals; the exit code (``--once``: undone files first, then quarantined ones)."""
    if config.once:  # stopped early: what was still waiting is undone too
        totals[UNDONE] += totals[Status.ABANDONED] + tracker.pending()
    log.info("stopped", extra={"event": "stopped", **totals})
    if config.once and totals[UNDONE]:
        log.error("%d file(s) left undone (output or system fault); run again once it is fixed", totals[UNDONE],
                  extra={"event": "undone", "files": totals[UNDONE]})
        return EXIT_UNDONE
    if config.once and totals[Status.QUARANTINED]:
        return EXIT_QUARANTINED
    return EXIT_OK
