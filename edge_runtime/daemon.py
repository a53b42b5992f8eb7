"""``lungseg-edge run``: the service loop.

Start-up: lock the state folder, open the ledger, remove temp files a killed run
left behind, load the model and choose the backend (logged, with the reason for
every fallback), start watching, queue the files already in the folder, then tell
systemd READY=1. The loop hands batches of complete files to the
:class:`~lungseg.edge_runtime.pipeline.Processor` and pings the systemd watchdog.

Stopping: the first SIGTERM/SIGINT lets the file being written finish (its
outputs are complete or absent, never partial) and abandons the rest of the
batch, which stays unrecorded and is processed after the next start. If the
current file is not done within ``STOP_GRACE_SECONDS`` (or on a second signal)
it is abandoned too: its temp files are removed and nothing is recorded.
"""

from __future__ import annotations

import _thread
import logging
import signal
import sqlite3
import threading
import time
from pathlib import Path

from lungseg.edge_runtime.config import EdgeConfig

log = logging.getLogger("lungseg.edge")

EXIT_OK = 0
EXIT_QUARANTINED = 1
EXIT_USAGE = 2
EXIT_NO_MODEL = 3
EXIT_BACKEND = 4
EXIT_STATE = 5
EXIT_INTERNAL = 70

STOP_GRACE_SECONDS = 7.0
TICK_SECONDS = 0.2


class _Signals:
    """SIGTERM/SIGINT -> stop flag; a second signal or the grace timer abandons the current file."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.previous: dict[int, object] = {}
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


def run(config: EdgeConfig, stop: threading.Event | None = None) -> int:
    """Run the watcher until stopped (or, with ``once``, until the folder is done). Returns an exit code."""
    from lungseg.edge_runtime.fsio import remove_stale_temps
    from lungseg.edge_runtime.ledger import Ledger, LedgerLockedError, StateLock
    from lungseg.edge_runtime.sdnotify import Notifier

    watch, out, state = Path(config.watch), Path(config.out), config.state_dir
    if not watch.is_dir():
        log.error("watch folder %s does not exist or is not a folder", watch)
        return EXIT_USAGE
    try:
        out.mkdir(parents=True, exist_ok=True)
        state.mkdir(parents=True, exist_ok=True)
        lock = StateLock(state).acquire()
    except LedgerLockedError as exc:
        log.error("%s", exc)
        return EXIT_STATE
    except OSError as exc:
        log.error("cannot use the output/state folders: %s", exc)
        return EXIT_STATE
    stop = stop or threading.Event()
    notifier = Notifier()
    signals = _Signals(stop).install()
    observer = None
    ledger = None
    forwarder = None
    try:
        removed = remove_stale_temps(out) + remove_stale_temps(config.quarantine_dir)
        if removed:
            log.warning("removed %d temp file(s) left by an interrupted run", removed)
        try:
            ledger = Ledger(state)
        except sqlite3.Error as exc:
            log.error("cannot open the ledger in %s: %s", state, exc)
            return EXIT_STATE
        loaded = _load_model(config)
        if isinstance(loaded, int):
            return loaded
        bundle, selection = loaded
        if config.forward_host:
            from lungseg.edge_runtime.forward import Forwarder, ForwardUnavailableError

            try:
                forwarder = Forwarder(out, state, config.forward_host, config.forward_port, config.forward_ae,
                                      config.forward_calling_ae, config.forward_retry_seconds)
            except ForwardUnavailableError as exc:
                log.error("%s", exc)
                return EXIT_USAGE
            log.warning("forwarding outputs to %s@%s:%d", config.forward_ae, config.forward_host,
                        config.forward_port, extra={"event": "forward_config"})
            if not config.once:
                forwarder.start()
        from lungseg.edge_runtime.pipeline import Processor

        processor = Processor(config, selection.predictor, bundle, ledger, stop, selection.fallbacks)
        prov = processor.provenance
        log.warning(
            "lungseg-edge %s ready: backend %s (%s), model %s %s sha256 %s, watching %s (%s)%s",
            prov.software_version, prov.backend, prov.precision, prov.model_name, prov.model_version,
            prov.model_sha256[:16], watch, "once" if config.once else ("polling" if config.polling else "inotify"),
            "; fallbacks: " + "; ".join(selection.fallbacks) if selection.fallbacks else "",
            extra={"event": "startup", "backend": prov.backend, "precision": prov.precision,
                   "fallbacks": selection.fallbacks, "model": prov.model_name, "model_version": prov.model_version,
                   "seg": config.seg, "batch_size": config.batch_size},
        )
        tracker = _make_tracker(config)
        if not config.once:
            from lungseg.edge_runtime.watcher import make_observer

            observer = make_observer(tracker, config.polling, config.poll_interval)
            observer.start()
        found = tracker.scan()
        log.info("%d file(s) already in the watch folder", found, extra={"event": "scan", "files": found})
        notifier.ready(f"watching, {found} file(s) queued at start")
        code = _loop(config, processor, tracker, notifier, stop)
        if forwarder is not None and config.once and not stop.is_set():
            forwarder.send_due(ledger, limit=10_000)  # one attempt for everything queued
        return code
    except KeyboardInterrupt:
        if stop.is_set():
            log.warning("stop: abandoned the file in progress (it will be processed after the next start)",
                        extra={"event": "abandoned"})
            return EXIT_OK
        raise
    finally:
        signals.restore()
        notifier.stopping()
        if observer is not None:
            observer.stop()
            observer.join(timeout=3)
        if forwarder is not None:
            forwarder.stop()
        if ledger is not None:
            ledger.close()
        lock.release()


def _load_model(config: EdgeConfig):
    from lungseg.bundle import ModelNotFoundError, resolve_bundle
    from lungseg.predictors import BackendUnavailableError, select_predictor

    try:
        bundle = resolve_bundle(config.model)
    except ModelNotFoundError as exc:
        log.error("no usable model: %s", exc, extra={"event": "no_model"})
        return EXIT_NO_MODEL
    try:
        selection = select_predictor(bundle, config.backend, config.threads)
    except BackendUnavailableError as exc:
        log.error("backend %s unavailable: %s", config.backend, exc, extra={"event": "backend_unavailable"})
        return EXIT_BACKEND
    for reason in selection.fallbacks:
        log.warning("fallback: %s", reason, extra={"event": "backend_fallback"})
    return bundle, selection


def _make_tracker(config: EdgeConfig):
    from lungseg.edge_runtime.watcher import ReadyTracker

    excluded = [Path(config.out), config.state_dir, config.quarantine_dir]
    return ReadyTracker(
        root=Path(config.watch), inotify=not (config.polling or config.once),
        stable_seconds=config.stable_seconds, settle_seconds=config.settle_seconds,
        ignore=config.ignore, excluded=excluded, recursive=config.recursive,
    )


def _loop(config: EdgeConfig, processor, tracker, notifier, stop: threading.Event) -> int:
    totals = {"done": 0, "duplicate": 0, "quarantined": 0, "seen": 0}
    next_rescan = time.monotonic() + config.rescan_seconds
    watch = Path(config.watch)
    while not stop.is_set():
        notifier.ping()
        batch = tracker.take_ready(limit=config.batch_size)
        if batch:
            for outcome in processor.process(batch):
                if outcome.status in totals:
                    totals[outcome.status] += 1
                elif outcome.status == "retry":
                    tracker.seen(watch / outcome.name, delay=outcome.retry_after)
            notifier.status("processed {done}, duplicates {duplicate}, quarantined {quarantined}; "
                            "{pending} pending".format(pending=tracker.pending(), **totals))
            continue
        if config.once and tracker.pending() == 0:
            break
        if not config.once and config.rescan_seconds > 0 and time.monotonic() >= next_rescan:
            tracker.scan()  # safety net for events lost (inotify queue overflow, network shares)
            next_rescan = time.monotonic() + config.rescan_seconds
        stop.wait(TICK_SECONDS)
    log.info("stopped", extra={"event": "stopped", **totals})
    if config.once and totals["quarantined"]:
        return EXIT_QUARANTINED
    return EXIT_OK
