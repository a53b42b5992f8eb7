"""The persistent ledger: which inputs were handled, so a duplicate or a restart never yields a second output.

SQLite in WAL mode with ``synchronous=FULL``: a commit is on disk when it returns.

Tables
------
``instances``  one row per source SOPInstanceUID that has outputs (the key that
               makes outputs unique).
``files``      one row per (content sha256, file name) handled: ``done``,
               ``duplicate`` (same content as a file already handled, or a
               SOPInstanceUID that already had outputs) or ``quarantined`` (with
               the reason code). Content is looked up by sha256 alone.
``paths``      cache of (relative path, size, mtime) -> sha256, so a restart does
               not re-hash every file already in the watch folder.
``forward``    outputs queued for C-STORE forwarding (when configured).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LEDGER_NAME = "ledger.sqlite3"
LOCK_NAME = "lungseg-edge.lock"
SCHEMA_VERSION = 1

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
CREATE TABLE IF NOT EXISTS paths (
    name     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS forward (
    path       TEXT PRIMARY KEY,
    sop_uid    TEXT,
    status     TEXT NOT NULL CHECK (status IN ('pending', 'sent')),
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_try   REAL NOT NULL,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class LedgerLockedError(RuntimeError):
    """Another ``lungseg-edge`` process holds this state folder."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class StateLock:
    """An exclusive ``flock`` on ``<state>/lungseg-edge.lock`` (released when the process dies)."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise LedgerLockedError(f"{self.path.parent}: another lungseg-edge process is using this "
                                    "state folder") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Ledger:
    """Read and record what happened to each input."""

    def __init__(self, state_dir: Path, readonly: bool = False):
        self.path = Path(state_dir) / LEDGER_NAME
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
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

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
    def sha_for_path(self, name: str, size: int, mtime_ns: int) -> str | None:
        row = self.db.execute("SELECT sha256 FROM paths WHERE name=? AND size=? AND mtime_ns=?",
                              (name, size, mtime_ns)).fetchone()
        return row[0] if row else None

    def remember_path(self, name: str, size: int, mtime_ns: int, sha256: str) -> None:
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO paths VALUES (?, ?, ?, ?)", (name, size, mtime_ns, sha256))

    def file_status(self, sha256: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT status, code, sop_uid, name FROM files WHERE sha256=? ORDER BY rowid LIMIT 1",
                              (sha256,)).fetchone()
        return dict(zip(("status", "code", "sop_uid", "name"), row, strict=True)) if row else None

    def instance(self, sop_uid: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT sha256, source_name, outputs, processed_at FROM instances WHERE sop_uid=?",
                              (sop_uid,)).fetchone()
        if not row:
            return None
        return {"sha256": row[0], "source_name": row[1], "outputs": json.loads(row[2]), "processed_at": row[3]}

    # --- records -------------------------------------------------------------
    def record_done(self, *, sha256: str, sop_uid: str, name: str, size: int, study_uid: str | None,
                    outputs: list[str], backend: str, model: str, forward: list[str] = ()) -> None:
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

    def record_duplicate(self, *, sha256: str, sop_uid: str | None, name: str, size: int,
                         code: str = "same_uid") -> None:
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO files VALUES (?, ?, 'duplicate', ?, ?, ?, ?)",
                            (sha256, name, code, sop_uid, size, _now()))

    def record_quarantine(self, *, sha256: str, name: str, size: int, code: str) -> None:
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO files VALUES (?, ?, 'quarantined', ?, NULL, ?, ?)",
                            (sha256, name, code, size, _now()))

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
