"""Watch a folder and hand out files only once they are complete.

A file becomes *ready* when

* inotify reported a close-after-write (``FileClosedEvent``) and nothing changed
  for ``settle_seconds`` since, or
* it was renamed/moved into the folder (the usual ``name.part`` -> ``name``
  convention) and its size and mtime stayed put for ``settle_seconds``, or
* no write was seen (present at start-up, polling mode, network shares): its size
  and mtime stayed put for ``stable_seconds``.

Under inotify a file that was seen being written waits for its close event
(with a long fallback in case the event is lost). Hidden names and temporary
names (``*.part``, ``*.tmp``, ...) are ignored, so are the output and state
folders when they lie inside the watch folder. The watcher only reads: it never
alters the watch folder, and never follows a link (links are handed on as they
are, to be reported and skipped, never read).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CLOSE_FALLBACK_SECONDS = 120.0


@dataclass
class _Entry:
    first_seen: float
    last_event: float
    needs_close: bool = False
    closed: bool = False
    moved_in: bool = False
    stat: tuple[int, int] | None = None
    stat_since: float = 0.0
    not_before: float = 0.0


@dataclass
class ReadyTracker:
    """Thread-safe set of candidate files and the rules that decide when each is complete."""

    root: Path
    inotify: bool = True
    stable_seconds: float = 2.0
    settle_seconds: float = 0.5
    ignore: Iterable[str] = ("*.part", "*.tmp")
    excluded: Iterable[Path] = ()
    recursive: bool = True
    _entries: dict[Path, _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.ignore = tuple(self.ignore)
        self.excluded = tuple(Path(p).resolve() for p in self.excluded)

    # --- what counts -----------------------------------------------------------
    def wanted(self, path: Path) -> bool:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        parts = rel.parts
        if not parts or any(part.startswith(".") for part in parts):
            return False
        if not self.recursive and len(parts) > 1:
            return False
        if any(fnmatch.fnmatch(parts[-1], pattern) for pattern in self.ignore):
            return False
        return not any(path == ex or ex in path.parents for ex in self.excluded)

    def relname(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # --- events (called from the observer thread) ------------------------------
    def _entry(self, path: Path, now: float) -> _Entry:
        entry = self._entries.get(path)
        if entry is None:
            entry = self._entries[path] = _Entry(first_seen=now, last_event=now, stat_since=now)
        return entry

    def _event(self, path: Path, **state: bool) -> None:
        """Record a filesystem event for ``path``: it is touched now, with ``state`` set on its entry."""
        if not self.wanted(path):
            return
        now = time.monotonic()
        with self._lock:
            entry = self._entry(path, now)
            entry.last_event = now
            for name, value in state.items():
                setattr(entry, name, value)

    def written(self, path: Path) -> None:
        self._event(path, closed=False, needs_close=self.inotify)

    def closed(self, path: Path) -> None:
        self._event(path, closed=True, needs_close=False)

    def moved_in(self, path: Path) -> None:
        self._event(path, moved_in=True, needs_close=False)

    def seen(self, path: Path, delay: float = 0.0) -> None:
        """A file found by a scan (start-up, rescan) or handed back for a retry."""
        if not self.wanted(path):
            return
        now = time.monotonic()
        with self._lock:
            entry = self._entry(path, now)
            entry.not_before = max(entry.not_before, now + delay)

    def gone(self, path: Path) -> None:
        with self._lock:
            self._entries.pop(path, None)

    def scan(self, folder: Path | None = None) -> int:
        """Add every wanted file under ``folder`` (default: the root); returns how many."""
        folder = Path(folder or self.root)
        found = 0
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if self.wanted(Path(dirpath) / d / "x")) if self.recursive \
                else []
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if self.wanted(path) and _candidate(path):
                    self.seen(path)
                    found += 1
        return found

    # --- readiness ---------------------------------------------------------------
    def pending(self) -> int:
        with self._lock:
            return len(self._entries)

    def oldest_wait(self) -> float:
        """Seconds since the longest-waiting pending file was first seen (0 when none)."""
        now = time.monotonic()
        with self._lock:
            first = min((e.first_seen for e in self._entries.values()), default=now)
        return now - first

    def next_due(self) -> float | None:
        """Seconds until the earliest retry, when every pending entry is a delayed retry."""
        now = time.monotonic()
        with self._lock:
            delays = [e.not_before - now for e in self._entries.values()]
        return max(0.0, min(delays)) if delays else None

    def take_ready(self, limit: int | None = None) -> list[Path]:
        """Remove and return the files that are complete now (oldest first)."""
        now = time.monotonic()
        wall = time.time()
        ready: list[tuple[float, Path]] = []
        with self._lock:
            items = list(self._entries.items())
        for path, entry in items:  # insertion order = first seen, so stop once the batch is full
            if limit is not None and len(ready) >= limit:
                break
            if entry.not_before > now:
                continue
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                self.gone(path)
                continue
            except OSError as exc:
                log.warning("cannot stat a watched file: %s", exc.strerror, extra={"file": self.relname(path)})
                continue
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                self.gone(path)
                continue
            signature = (st.st_size, st.st_mtime_ns)
            with self._lock:
                if self._entries.get(path) is not entry:
                    continue
                if entry.stat != signature:
                    entry.stat, entry.stat_since = signature, now
                    quiet = 0.0
                else:
                    quiet = now - entry.stat_since
                since_event = now - entry.last_event
                mtime_age = wall - st.st_mtime
                if entry.needs_close:
                    is_ready = quiet >= CLOSE_FALLBACK_SECONDS
                elif entry.closed or entry.moved_in:
                    is_ready = since_event >= self.settle_seconds and (
                        quiet >= self.settle_seconds or mtime_age >= self.settle_seconds)
                else:
                    is_ready = (quiet >= self.stable_seconds or (
                        mtime_age >= self.stable_seconds and since_event >= self.settle_seconds
                        and entry.stat_since < now))
                if is_ready:
                    ready.append((entry.first_seen, path))
        ready.sort()
        with self._lock:
            for _, path in ready:
                self._entries.pop(path, None)
        return [path for _, path in ready]


def _candidate(path: Path) -> bool:
    """A regular file, or a link (reported and skipped later, never followed)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


def make_observer(tracker: ReadyTracker, polling: bool, poll_interval: float):
    """A started-later watchdog observer feeding ``tracker`` (inotify, or stat polling)."""
    from watchdog.events import (
        DirCreatedEvent,
        DirMovedEvent,
        FileClosedEvent,
        FileCreatedEvent,
        FileDeletedEvent,
        FileModifiedEvent,
        FileMovedEvent,
        FileSystemEventHandler,
    )

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event) -> None:
            try:
                if isinstance(event, FileClosedEvent):
                    tracker.closed(Path(os.fsdecode(event.src_path)))
                elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
                    tracker.written(Path(os.fsdecode(event.src_path)))
                elif isinstance(event, FileMovedEvent):
                    tracker.gone(Path(os.fsdecode(event.src_path)))
                    tracker.moved_in(Path(os.fsdecode(event.dest_path)))
                elif isinstance(event, FileDeletedEvent):
                    tracker.gone(Path(os.fsdecode(event.src_path)))
                elif isinstance(event, DirMovedEvent):
                    tracker.scan(Path(os.fsdecode(event.dest_path)))
                elif isinstance(event, DirCreatedEvent):
                    tracker.scan(Path(os.fsdecode(event.src_path)))
            except Exception:  # an event must never kill the observer thread
                log.exception("error while handling a file-system event")

    from watchdog.observers import Observer
    from watchdog.observers.api import BaseObserver
    from watchdog.observers.polling import PollingObserver

    observer: BaseObserver = PollingObserver(timeout=poll_interval) if polling else Observer()
    observer.schedule(Handler(), str(tracker.root), recursive=tracker.recursive)
    return observer
