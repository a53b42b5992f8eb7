"""The persistent ledger: which inputs were handled, so a duplicate or a restart never yields a second output.

SQLite in WAL mode with ``synchronous=FULL``: a commit is on disk when it returns.

Tables
------
``instances``  one row per source SOPInstanceUID that has outputs (the key that
               makes outputs unique).
``files``      one row per (content sha256, file reference) handled: ``done``,
               ``duplicate`` (same content as a file already done, or a
               SOPInstanceUID that already had outputs) or ``quarantined`` (with
               the reason code). The file reference is a keyed hash of the
               resolved path (:mod:`~lungseg.edge_runtime.names`), never a name.
``path_cache`` (file reference, size, mtime, ctime, inode) -> sha256, so a restart
               does not re-hash every file already in the watch folder; a file
               rewritten in place (same size and mtime) has a new ctime, so it is
               hashed (and processed) again.
``attempts``   content being processed now: written *before* decoding and removed
               when the file's outcome is recorded. A row left by a run that died
               makes the content a suspect: it is processed alone next time, and
               each death while it was alone is counted (``crashes`` when a fatal
               signal was recorded, ``deaths`` otherwise, e.g. SIGKILL), so content
               that takes the daemon down is quarantined instead of crash-looping,
               while files that merely shared a batch with it are not blamed.
``forward``    outputs queued for C-STORE forwarding (when configured).

A database that cannot be opened (corrupt file, junk header) is moved aside as
``ledger.sqlite3.corrupt-<time>`` and a new one is rebuilt from what is on disk:
the sidecars in the output folder and the reason files in the quarantine folder.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("lungseg.edge")

LEDGER_NAME = "ledger.sqlite3"
LOCK_NAME = "lungseg-edge.lock"
OUT_LOCK_NAME = ".lungseg-out.lock"
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid      TEXT PRIMARY KEY,
    sha256       TEXT NOT NULL,
    source_name  TEXT NOT NULL,
    study_uid    TEXT,
    outputs      TEXT NOT NULL,
    backend      TEXT,
    model        TEXT,
    processed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    sha256   TEXT NOT NULL,
    name     TEXT NOT NULL,
    status   TEXT NOT NULL CHECK (status IN ('done', 'duplicate', 'quarantined')),
    code     TEXT,
    sop_uid  TEXT,
    size     INTEGER,
    seen_at  TEXT NOT NULL,
    PRIMARY KEY (sha256, name)
);
CREATE TABLE IF NOT EXISTS path_cache (
    name     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode    INTEGER NOT NULL,
    sha256   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    sha256     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    crashes    INTEGER NOT NULL DEFAULT 0,
    deaths     INTEGER NOT NULL DEFAULT 0,
    solo       INTEGER NOT NULL DEFAULT 0,
    started_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS forward (
    path       TEXT PRIMARY KEY,
    sop_uid    TEXT,
    status     TEXT NOT NULL CHECK (status IN ('pending', 'sent')),
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_try   REAL NOT NULL,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS forward_dead (
    path       TEXT PRIMARY KEY,
    sop_uid    TEXT,
    attempts   INTEGER NOT NULL,
    last_error TEXT,
    dead_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class LedgerLockedError(RuntimeError):
    """Another ``lungseg-edge`` process holds this state (or output) folder."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class StateLock:
    """An exclusive ``flock`` on ``<state>/lungseg-edge.lock`` (released when the process dies).

    ``OutputLock`` is the same on ``<out>/.lungseg-out.lock``: two daemons with different
    state folders must not share one output folder either.
    """

    lock_name = LOCK_NAME
    what = "state"
    write_pid = True

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.lock_name
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise LedgerLockedError(f"{self.path.parent}: another lungseg-edge process is using this "
                                    f"{self.what} folder") from exc
        if self.write_pid:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class OutputLock(StateLock):
    lock_name = OUT_LOCK_NAME
    what = "output"
    write_pid = False  # the output folder's files change only when outputs do


class Ledger:
    """Read and record what happened to each input."""

    def __init__(self, state_dir: Path, readonly: bool = False):
        self.path = Path(state_dir) / LEDGER_NAME
        self.rebuilt_from: Path | None = None
        if readonly:
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            return
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        with self.transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        row = self.db.execute("PRAGMA quick_check").fetchone()
        if not row or row[0] != "ok":
            self.db.close()
            raise sqlite3.DatabaseError(f"ledger integrity check failed: {row[0] if row else 'no answer'}")

    @classmethod
    def open_or_rebuild(cls, state_dir: Path, out: Path, quarantine_dir: Path) -> Ledger:
        """Open the ledger; a corrupt one is moved aside and rebuilt from the outputs on disk (logged loudly)."""
        try:
            return cls(state_dir)
        except sqlite3.OperationalError:  # locked, unreadable folder, I/O: not corruption, never moved aside
            raise
        except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
            error = f"{type(exc).__name__}: {exc}"
        path = Path(state_dir) / LEDGER_NAME
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = path.with_name(f"{LEDGER_NAME}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        ledger = cls(state_dir)
        ledger.rebuilt_from = aside
        done, quarantined = ledger.rebuild(Path(out), Path(quarantine_dir))
        log.critical("the ledger was unreadable (%s); moved it aside to %s and rebuilt it from the outputs on disk: "
                     "%d processed, %d quarantined", error, aside.name, done, quarantined,
                     extra={"event": "ledger_rebuilt", "moved_to": aside.name, "done": done,
                            "quarantined": quarantined})
        return ledger

    def rebuild(self, out: Path, quarantine_dir: Path) -> tuple[int, int]:
        """Fill the tables from the sidecars under ``out`` and the reason files in ``quarantine_dir``."""
        done = quarantined = 0
        with self.transaction():
            sidecars = sorted(p for p in out.glob("*/*.json") if not p.parent.name.startswith(".")
                              and p.parent.resolve() != quarantine_dir.resolve()) if out.is_dir() else []
            for sidecar in sidecars:
                try:
                    info = json.loads(sidecar.read_text())
                    source = info["source"]
                    outputs = [p.relative_to(out).as_posix() for p in sorted(sidecar.parent.glob(
                        source["sop_instance_uid"] + ".*")) if not p.name.startswith(".")]
                    key = source.get("file_ref") or source["file"]
                    self.db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                    (source["sop_instance_uid"], source["sha256"], key,
                                     source.get("study_instance_uid"), json.dumps(outputs), info.get("backend"),
                                     None, info.get("processed_at") or _now()))
                    self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, 'done', NULL, ?, NULL, ?)",
                                    (source["sha256"], key, source["sop_instance_uid"], _now()))
                    done += 1
                except (OSError, ValueError, KeyError, TypeError):
                    continue
            for reason_file in sorted(quarantine_dir.glob("*.reason.json")) if quarantine_dir.is_dir() else []:
                try:
                    reason = json.loads(reason_file.read_text())
                    self.db.execute("INSERT OR IGNORE INTO files VALUES (?, ?, 'quarantined', ?, NULL, ?, ?)",
                                    (reason["sha256"], reason.get("file_ref") or reason["source"], reason["code"],
                                     reason.get("size"), reason.get("time") or _now()))
                    quarantined += 1
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        return done, quarantined

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- look-ups ------------------------------------------------------------
    def sha_for_path(self, name: str, st: os.stat_result) -> str | None:
        """The cached sha256 of this file, if its size, mtime, ctime and inode are unchanged."""
        row = self.db.execute("SELECT sha256 FROM path_cache WHERE name=? AND size=? AND mtime_ns=? AND ctime_ns=? "
                              "AND inode=?", (name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)).fetchone()
        return row[0] if row else None

    def remember_path(self, name: str, st: os.stat_result, sha256: str) -> None:
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO path_cache VALUES (?, ?, ?, ?, ?, ?)",
                            (name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, sha256))

    def file_status(self, sha256: str, name: str | None = None) -> dict[str, Any] | None:
        """What happened to this content: at this file reference when ``name`` is given, else anywhere
        (a ``done`` row first: content that was only ever quarantined is not "done")."""
        if name is not None:
            row = self.db.execute("SELECT status, code, sop_uid, name FROM files WHERE sha256=? AND name=?",
                                  (sha256, name)).fetchone()
        else:
            row = self.db.execute("SELECT status, code, sop_uid, name FROM files WHERE sha256=? "
                                  "ORDER BY status='quarantined', rowid LIMIT 1", (sha256,)).fetchone()
        return dict(zip(("status", "code", "sop_uid", "name"), row, strict=True)) if row else None

    # --- attempts (poison detection) ------------------------------------------
    def attempt(self, sha256: str) -> dict[str, int] | None:
        """The unfinished attempt on this content left by an earlier run, if any."""
        row = self.db.execute("SELECT crashes, deaths FROM attempts WHERE sha256=?", (sha256,)).fetchone()
        return {"crashes": int(row[0]), "deaths": int(row[1])} if row else None

    def begin_attempt(self, sha256: str, name: str) -> None:
        """Record that processing of this content starts now (before its bytes are decoded)."""
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO attempts (sha256, name, started_at) VALUES (?, ?, ?)",
                            (sha256, name, _now()))
            self.db.execute("UPDATE attempts SET solo=0, started_at=? WHERE sha256=?", (_now(), sha256))

    def set_solo(self, sha256: str) -> None:
        """This content is the only one in progress (a death now is charged to it)."""
        with self.transaction():
            self.db.execute("UPDATE attempts SET solo=1 WHERE sha256=?", (sha256,))

    def account_unfinished(self, crashed: bool) -> int:
        """At start-up: charge the previous run's death to the content that was in progress alone;
        returns how many contents were in progress (all of them are suspects now)."""
        column = "crashes" if crashed else "deaths"
        with self.transaction():
            self.db.execute(f"UPDATE attempts SET {column}={column}+solo, solo=0")
            return int(self.db.execute("SELECT COUNT(*) FROM attempts").fetchone()[0])

    def end_attempt(self, sha256: str) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM attempts WHERE sha256=?", (sha256,))

    def forget_missing_outputs(self, out: Path) -> list[str]:
        """Forget instances whose outputs were deleted, so their sources are processed again; returns the UIDs."""
        forgotten = []
        for sop_uid, sha, outputs in self.db.execute("SELECT sop_uid, sha256, outputs FROM instances").fetchall():
            if all((out / o).is_file() for o in json.loads(outputs)):
                continue
            forgotten.append(sop_uid)
            with self.transaction():
                self.db.execute("DELETE FROM instances WHERE sop_uid=?", (sop_uid,))
                self.db.execute("DELETE FROM files WHERE sop_uid=? OR sha256=?", (sop_uid, sha))
        return forgotten

    def instance(self, sop_uid: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT sha256, source_name, outputs, processed_at FROM instances WHERE sop_uid=?",
                              (sop_uid,)).fetchone()
        if not row:
            return None
        return {"sha256": row[0], "source_name": row[1], "outputs": json.loads(row[2]), "processed_at": row[3]}

    # --- records -------------------------------------------------------------
    def record_done(self, *, sha256: str, sop_uid: str, name: str, size: int, study_uid: str | None,
                    outputs: list[str], backend: str, model: str, forward: Sequence[str] = ()) -> None:
        """One transaction: the instance and its file are done (call after outputs are durable),
        and the outputs in ``forward`` are queued for C-STORE."""
        now = _now()
        with self.transaction():
            for path in forward:
                self.db.execute("INSERT OR REPLACE INTO forward VALUES (?, ?, 'pending', 0, 0, NULL)",
                                (path, sop_uid))
            self.db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (sop_uid, sha256, name, study_uid, json.dumps(outputs), backend, model, now))
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, 'done', NULL, ?, ?, ?)",
                            (sha256, name, sop_uid, size, now))
            self.db.execute("DELETE FROM attempts WHERE sha256=?", (sha256,))

    def record_duplicate(self, *, sha256: str, sop_uid: str | None, name: str, size: int,
                         code: str = "same_uid") -> None:
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO files VALUES (?, ?, 'duplicate', ?, ?, ?, ?)",
                            (sha256, name, code, sop_uid, size, _now()))
            self.db.execute("DELETE FROM attempts WHERE sha256=?", (sha256,))

    def record_quarantine(self, *, sha256: str, name: str, size: int, code: str) -> None:
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, 'quarantined', ?, NULL, ?, ?)",
                            (sha256, name, code, size, _now()))
            self.db.execute("DELETE FROM attempts WHERE sha256=?", (sha256,))

    # --- forwarding queue ------------------------------------------------------
    def forward_due(self, now: float, limit: int) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT path, sop_uid, attempts FROM forward WHERE status='pending' AND next_try<=? "
                               "ORDER BY next_try, rowid LIMIT ?", (now, limit)).fetchall()
        return [dict(zip(("path", "sop_uid", "attempts"), row, strict=True)) for row in rows]

    def forward_sent(self, path: str) -> None:
        with self.transaction():
            self.db.execute("UPDATE forward SET status='sent', last_error=NULL WHERE path=?", (path,))

    def forward_failed(self, path: str, error: str, next_try: float) -> None:
        with self.transaction():
            self.db.execute("UPDATE forward SET attempts=attempts+1, next_try=?, last_error=? WHERE path=?",
                            (next_try, error, path))

    def forward_dead_letter(self, path: str, error: str) -> None:
        """Give up on an output: moved from the queue to ``forward_dead`` (``forward_retry`` brings it back)."""
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO forward_dead SELECT path, sop_uid, attempts + 1, ?, ? FROM forward "
                            "WHERE path=?", (error, time.time(), path))
            self.db.execute("DELETE FROM forward WHERE path=?", (path,))

    def forward_dead(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT path, sop_uid, attempts, last_error, dead_at FROM forward_dead "
                               "ORDER BY dead_at, path").fetchall()
        return [dict(zip(("path", "sop_uid", "attempts", "last_error", "dead_at"), row, strict=True)) for row in rows]

    def forward_dead_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM forward_dead").fetchone()[0])

    def forward_retry(self, paths: Sequence[str] | None = None) -> int:
        """Queue dead letters again (all, or those in ``paths``) with a fresh attempt count; returns how many."""
        with self.transaction():
            rows = self.forward_dead() if paths is None else [r for r in self.forward_dead() if r["path"] in paths]
            for row in rows:
                self.db.execute("INSERT OR REPLACE INTO forward VALUES (?, ?, 'pending', 0, 0, NULL)",
                                (row["path"], row["sop_uid"]))
                self.db.execute("DELETE FROM forward_dead WHERE path=?", (row["path"],))
        return len(rows)

    def forward_reschedule(self, now: float) -> int:
        """Every pending output due now (the peer answered a C-ECHO again); returns how many were waiting."""
        with self.transaction():
            return int(self.db.execute("UPDATE forward SET next_try=? WHERE status='pending' AND next_try>?",
                                       (now, now)).rowcount)

    # --- reporting -----------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        by_status = dict(self.db.execute("SELECT status, COUNT(*) FROM files GROUP BY status").fetchall())
        by_code = dict(self.db.execute(
            "SELECT code, COUNT(*) FROM files WHERE status='quarantined' GROUP BY code").fetchall())
        last = self.db.execute("SELECT MAX(processed_at) FROM instances").fetchone()[0]
        forward = dict(self.db.execute("SELECT status, COUNT(*) FROM forward GROUP BY status").fetchall())
        return {
            "instances": self.db.execute("SELECT COUNT(*) FROM instances").fetchone()[0],
            "done": by_status.get("done", 0),
            "duplicate": by_status.get("duplicate", 0),
            "quarantined": by_status.get("quarantined", 0),
            "quarantined_by_code": by_code,
            "last_processed_at": last,
            "forward_pending": forward.get("pending", 0),
            "forward_sent": forward.get("sent", 0),
        }
