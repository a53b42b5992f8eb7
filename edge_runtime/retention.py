"""The disk guard (on by default) and age- and free-space-based retention (off by default).

**Disk guard.** Free space is *low* on a folder's file system when it is below
``disk_min_free_mb`` or below ``disk_min_free_percent`` of the file system (either set to
0 is not checked), for any of the watch, output and state folders. While it is low, the
C-STORE receiver answers ``0xA700`` (out of resources) before writing anything, the folder
path takes no new work (the files wait in the folder, nothing is lost), and ``/healthz``
answers 503 with the reason. It ends by itself once every folder has 10 % more than the
watermark free again (the margin keeps it from flapping). Each change is logged and audited.

**Retention.** Files older than so many days (by modification time; 0: kept for ever):

* ``retention_received_days`` -- the files the receiver wrote into the watch folder
  (known by their reference, size and content hash in ``<state>/received.jsonl``), and only
  once the ledger has them handled. The device's own files in the watch folder are never
  touched unless ``retention_watch_files`` is set too (then every handled file there ages out);
* ``retention_output_days`` -- outputs under the output folder, except those still waiting to
  be forwarded; emptied study folders are removed;
* ``retention_quarantine_days`` -- quarantined copies with their ``.reason.json``;
* ``retention_log_days`` -- ``crash.log.*`` files in the state folder (the audit trail is kept).

**Free-space retention.** With ``retention_min_free_mb`` set (above the disk guard's
``disk_min_free_mb``, so room is made before work stops), a sweep that finds less free space
on the output or watch folder's file system deletes the oldest of those same deletable
files (handled received files, the device's handled files only with
``retention_watch_files``, delivered outputs, quarantined copies), whatever their age,
until there is room again; never a file not yet processed, never an output still to be
delivered.

Every deletion is an audit event (``retention_delete``, with ``by``: ``age`` or ``free_space``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungseg.atomic import atomic_write
from lungseg.edge_runtime import audit
from lungseg.edge_runtime.ledger import Ledger
from lungseg.edge_runtime.logs import valid_uid
from lungseg.edge_runtime.quarantine import REASON_SUFFIX

log = logging.getLogger("lungseg.edge.retention")

RESUME_MARGIN = 1.10
CHECK_INTERVAL_SECONDS = 1.0
RECEIVED_REGISTRY = "received.jsonl"
DAY = 86400.0

StatVfs = Callable[[str], Any]


class DiskGuard:
    """Free space of the folders against the watermark, checked at most once per ``interval`` seconds."""

    def __init__(self, folders: Iterable[Path], min_free_mb: float, min_free_percent: float,
                 statvfs: StatVfs = os.statvfs, interval: float = CHECK_INTERVAL_SECONDS):
        self.folders = list(dict.fromkeys(Path(f) for f in folders))
        self.min_free_bytes = float(min_free_mb) * (1 << 20)
        self.min_free_percent = float(min_free_percent)
        self.statvfs = statvfs
        self.interval = float(interval)
        self.lock = threading.Lock()
        self.reason: str | None = None
        self.checked_at = -1e18
        self.detail: dict[str, int] = {}  # for the audit trail: the numbers without the folder's path

    @property
    def active(self) -> bool:
        return self.min_free_bytes > 0 or self.min_free_percent > 0

    def _shortage(self, margin: float) -> str | None:
        for folder in self.folders:
            try:
                st = self.statvfs(str(folder))
            except OSError:
                continue  # a folder that is missing now (the watch folder replaced): the others still count
            free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            need = max(self.min_free_bytes, total * self.min_free_percent / 100.0) * margin
            if free < need:
                self.detail = {"free_mb": round(free / (1 << 20)), "minimum_mb": round(need / margin / (1 << 20))}
                return (f"low disk space on {folder}: {free / (1 << 20):.0f} MB free "
                        f"({100.0 * free / max(total, 1):.1f} %), the minimum is {need / margin / (1 << 20):.0f} MB")
        return None

    def check(self) -> str | None:
        """The reason free space is low now, or ``None``."""
        if not self.active:
            return None
        with self.lock:
            now = time.monotonic()
            if now - self.checked_at < self.interval:
                return self.reason
            self.checked_at = now
            was = self.reason
            self.reason = self._shortage(RESUME_MARGIN if was else 1.0)
            if self.reason and not was:
                log.error("%s: not accepting new work until space is freed", self.reason,
                          extra={"event": "disk_low"})
                audit.record("disk_low", **self.detail)
            elif was and not self.reason:
                log.warning("disk space is sufficient again: accepting new work", extra={"event": "disk_ok"})
                audit.record("disk_ok")
            return self.reason


# --- the receiver's files --------------------------------------------------------------------------------------
class ReceivedFiles:
    """``<state>/received.jsonl``: reference, size and hash of every file the receiver wrote (thread-safe)."""

    def __init__(self, state_dir: Path, hasher: audit.Hasher):
        self.path = Path(state_dir) / RECEIVED_REGISTRY
        self.hasher = hasher
        self.lock = threading.Lock()

    def add(self, path: Path, size: int, sha256: str) -> None:
        """Remember a file the receiver wrote (a failure only means retention keeps it)."""
        line = json.dumps({"file": self.hasher.file_ref(path), "size": size, "sha256": sha256}) + "\n"
        try:
            with self.lock, self.path.open("a") as fh:
                fh.write(line)
        except OSError as exc:
            log.warning("could not note a received file for retention (%s)", exc.strerror,
                        extra={"event": "retention_failed"})

    def load(self) -> dict[str, dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = {}
        with self.lock, contextlib.suppress(FileNotFoundError), self.path.open() as fh:
            for raw in fh:
                with contextlib.suppress(ValueError, KeyError):
                    entry = json.loads(raw)
                    entries[entry["file"]] = entry
        return entries

    def wrote(self, path: Path, sha256: str) -> bool:
        """Whether the receiver wrote exactly these bytes (``sha256``) at ``path``."""
        entry = self.load().get(self.hasher.file_ref(path))
        return entry is not None and entry.get("sha256") == sha256

    def forget_file(self, path: Path) -> None:
        """``path`` is gone (moved into quarantine): nothing for retention to delete."""
        self.forget({self.hasher.file_ref(path)})

    def forget(self, refs: set[str]) -> None:
        if not refs:
            return
        with self.lock:
            kept = []
            with contextlib.suppress(FileNotFoundError), self.path.open() as fh:
                kept = [raw for raw in fh if not any(f'"{r}"' in raw for r in refs)]
            atomic_write(self.path, "".join(kept))


# --- retention -------------------------------------------------------------------------------------------------
@dataclass
class _Deletable:
    """A file retention may delete, with what its deletion records."""

    path: Path
    mtime: float
    kind: str  # "received", "watch", "output", "quarantine"
    fields: dict[str, Any]  # the audit record's fields
    companion: Path | None = None  # deleted first (a quarantined copy beside its reason file)
    ref: str | None = None  # a received file's reference, forgotten once it is deleted


class Retention:
    """One sweep deletes what has aged out, then, below ``retention_min_free_mb`` free, the oldest deletable
    files whatever their age until there is room again (see the module docstring); every deletion is audited."""

    def __init__(self, config: Any, ledger: Ledger, received: ReceivedFiles, hasher: audit.Hasher,
                 statvfs: StatVfs = os.statvfs):
        self.config = config
        self.ledger = ledger
        self.received = received
        self.hasher = hasher
        self.statvfs = statvfs

    @property
    def active(self) -> bool:
        c = self.config
        return any(getattr(c, n, 0) > 0 for n in ("retention_received_days", "retention_output_days",
                                                   "retention_quarantine_days", "retention_log_days",
                                                   "retention_min_free_mb"))


    def sweep(self, now: float | None = None) -> dict[str, int]:
        """Delete what is older than its retention, then the oldest deletable files while free space is below
        ``retention_min_free_mb``; returns how many files of each kind."""
        now = time.time() if now is None else now
        c = self.config
        done = {"received": 0, "watch": 0, "output": 0, "quarantine": 0, "log": 0}
        aged: list[_Deletable] = []
        if c.retention_received_days > 0:
            aged += self._watch_items(now - c.retention_received_days * DAY)
        if c.retention_output_days > 0:
            aged += self._output_items(now - c.retention_output_days * DAY)
        if c.retention_quarantine_days > 0:
            aged += self._quarantine_items(now - c.retention_quarantine_days * DAY)
        forgotten: set[str] = set()
        for item in aged:
            self._delete(item, done, forgotten)
        if self.short_of_space():
            pool = sorted(self._watch_items(math.inf) + self._output_items(math.inf)
                          + self._quarantine_items(math.inf), key=lambda i: i.mtime)
            for item in pool:  # oldest first, until there is room again
                if not self.short_of_space():
                    break
                self._delete(item, done, forgotten, by="free_space")
        self.received.forget(forgotten)
        self._remove_empty_studies()
        if c.retention_log_days > 0:
            for path in Path(c.state_dir).glob("crash.log.*"):
                if _older(path, now - c.retention_log_days * DAY) and _unlink(path):
                    done["log"] += 1
                    audit.record("retention_delete", kind="log", name=path.name)
        if any(done.values()):
            log.info("retention: deleted %s", ", ".join(f"{n} {k}" for k, n in done.items() if n),
                     extra={"event": "retention", **done})
        return done

    def short_of_space(self) -> bool:
        """Whether the output or watch folder's file system has less than ``retention_min_free_mb`` free
        (``False`` while free-space retention is off)."""
        if getattr(self.config, "retention_min_free_mb", 0) <= 0:
            return False
        need = float(self.config.retention_min_free_mb) * (1 << 20)
        for folder in (self.config.out_dir, self.config.watch_dir):
            with contextlib.suppress(OSError):
                st = self.statvfs(str(folder))
                if st.f_bavail * st.f_frsize < need:
                    return True
        return False

    def _delete(self, item: _Deletable, done: dict[str, int], forgotten: set[str], by: str = "age") -> None:
        if item.companion is not None:
            _unlink(item.companion)
        if _unlink(item.path):
            done[item.kind] += 1
            audit.record("retention_delete", kind=item.kind, by=by, **item.fields)
            if item.ref is not None:
                forgotten.add(item.ref)

    def _watch_items(self, cutoff: float) -> list[_Deletable]:
        """Handled files in the watch folder older than ``cutoff``: the receiver's (and, with
        ``retention_watch_files``, the device's); never one not yet processed."""
        watch = Path(self.config.watch_dir)
        received = self.received.load()
        items: list[_Deletable] = []
        candidates = watch.rglob("*") if self.config.retention_watch_files else watch.glob("*.dcm")
        for path in candidates:
            try:
                st = path.lstat()
            except OSError:
                continue
            if not path.is_file() or path.is_symlink() or path.name.startswith(".") or st.st_mtime >= cutoff:
                continue
            ref = self.hasher.file_ref(path)
            sha = self.ledger.sha_for_path(ref, st)  # None: not read (so not handled) since it last changed
            entry = received.get(ref)
            ours = (entry is not None and entry["size"] == st.st_size and valid_uid(path.stem)
                    and path.parent == watch and sha == entry["sha256"])
            handled = sha is not None and self.ledger.file_status(sha, ref) is not None
            if not (ours or self.config.retention_watch_files) or not handled:
                continue  # never a file not yet processed: nothing accepted is lost
            items.append(_Deletable(path, st.st_mtime, "received" if ours else "watch", {"file": ref, "sha256": sha},
                                    ref=ref if ours else None))
        return items

    def _studies(self) -> list[Path]:
        out = Path(self.config.out_dir)
        skip = {Path(self.config.state_dir).resolve(), Path(self.config.quarantine_dir).resolve()}
        return [study for study in out.iterdir() if study.is_dir() and not study.is_symlink()
                and study.resolve() not in skip and valid_uid(study.name)] if out.is_dir() else []

    def _output_items(self, cutoff: float) -> list[_Deletable]:
        """Outputs older than ``cutoff``, except those still waiting to be forwarded."""
        out = Path(self.config.out_dir)
        items: list[_Deletable] = []
        for study in self._studies():
            for path in study.iterdir():
                if not path.is_file() or path.name.startswith(".") or not _older(path, cutoff):
                    continue
                rel = path.relative_to(out).as_posix()
                row = self.ledger.db.execute("SELECT status FROM forward WHERE path=?", (rel,)).fetchone()
                if row is not None and row[0] == "pending":
                    continue  # still to be delivered
                sop, _, kind = path.name.partition(".")
                items.append(_Deletable(path, path.lstat().st_mtime, "output",
                                        {"output": kind, "sop": sop, "study": study.name}))
        return items

    def _remove_empty_studies(self) -> None:
        for study in self._studies():
            with contextlib.suppress(OSError):
                study.rmdir()  # only when empty

    def _quarantine_items(self, cutoff: float) -> list[_Deletable]:
        """Quarantined copies (with their reason files) older than ``cutoff``."""
        folder = Path(self.config.quarantine_dir)
        if not folder.is_dir():
            return []
        items: list[_Deletable] = []
        for reason_path in folder.glob(f"*{REASON_SUFFIX}"):
            if not _older(reason_path, cutoff):
                continue
            info: dict[str, Any] = {}
            with contextlib.suppress(OSError, ValueError):
                info = json.loads(reason_path.read_text())
            copy = reason_path.with_name(reason_path.name[: -len(REASON_SUFFIX)])
            items.append(_Deletable(reason_path, reason_path.lstat().st_mtime, "quarantine",
                                    {"file": info.get("file_ref"), "sha256": info.get("sha256"),
                                     "code": info.get("code")}, companion=copy))
        return items


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime < cutoff
    except OSError:
        return False


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("retention: could not delete a file (%s)", exc.strerror, extra={"event": "retention_failed"})
        return False
