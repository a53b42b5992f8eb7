"""The audit trail: an append-only, hash-chained JSON Lines record of what the box did.

One line per event -- ``receive``, ``process``, ``output``, ``forward``, ``quarantine``,
``retention_delete``, ``start``, ``config_change``, ``model_change``, ``selftest``,
``demotion``, ``disk_low``, ``disk_ok`` -- in ``<state>/audit/audit.jsonl``::

    {"seq": 12, "time": "2026-...Z", "event": "process", "file": "f-0123...", "sha256": "...",
     "sop": "uid:89ab...", "study": "uid:...", "outcome": "done", "backend": "cpu-fp32",
     "model_version": "...", "bundle_sha256": "...", "prev": "<hash of line 11>", "hash": "<this line's>"}

``hash`` is the SHA-256 of ``prev`` and the line's other fields (canonical JSON: sorted keys,
no spaces), so changing, removing or reordering any line breaks the chain from there on
(:func:`verify`). When the file reaches ``max_bytes`` it is renamed ``audit.<first seq>.jsonl``
and a new ``audit.jsonl`` starts whose first line chains to the last hash of the old one.

No patient data: files are named by their reference (:mod:`~lungseg.edge_runtime.names`,
always the keyed hash, never a name) and the content's SHA-256; SOP and study UIDs are
a keyed hash (``uid:`` + 16 hex digits, the key being ``<state>/name-key``) unless the site
opts in (``audit_uids``); output files are named by their kind only (their paths hold UIDs).

Writes are serialised by a lock (the pipeline, receiver and forwarder threads all write),
each line goes out in one ``write`` to an ``O_APPEND`` file and is fsynced before
:func:`record` returns. The trail never decides an outcome: a failed write is logged and
counted, never raised.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungseg.atomic import fsync_dir
from lungseg.edge_runtime.names import load_key

log = logging.getLogger("lungseg.edge.audit")

FOLDER = "audit"
ACTIVE = "audit.jsonl"
GENESIS = "0" * 64
DEFAULT_MAX_BYTES = 64 << 20
TAIL_BYTES = 1 << 16  # more than any one line
_ROTATED = re.compile(r"audit\.(\d+)\.jsonl$")


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def line_hash(entry: dict[str, Any]) -> str:
    """The chain hash of a line: SHA-256 over its fields without ``hash`` (``prev`` included)."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def trail_files(folder: Path) -> list[Path]:
    """The trail's files in chain order: rotated ones by their first sequence number, then the active one."""
    folder = Path(folder)
    rotated = sorted((int(m.group(1)), p) for p in folder.glob("audit.*.jsonl") if (m := _ROTATED.match(p.name)))
    files = [p for _, p in rotated]
    if (folder / ACTIVE).is_file():
        files.append(folder / ACTIVE)
    return files


class Hasher:
    """Keyed references for UIDs and files, the same in the runtime and in ``lungseg-edge audit``."""

    def __init__(self, state_dir: Path, reveal_uids: bool = False):
        self.key = load_key(Path(state_dir))
        self.reveal_uids = reveal_uids

    def uid(self, uid: object) -> str | None:
        if uid is None or str(uid) == "":
            return None
        if self.reveal_uids:
            return str(uid)
        return "uid:" + hmac.new(self.key, str(uid).encode(), hashlib.sha256).hexdigest()[:16]

    def uid_forms(self, uid: str) -> set[str]:
        """Every form a UID may have in the trail (hashed, and in clear for a site that opted in)."""
        return {str(uid), "uid:" + hmac.new(self.key, str(uid).encode(), hashlib.sha256).hexdigest()[:16]}

    def file_ref(self, path: Path) -> str:
        """The runtime's reference of a (resolved) path: :meth:`FileNamer.key_for`."""
        return "f-" + hmac.new(self.key, os.fsencode(str(path)), hashlib.sha256).hexdigest()[:16]


class AuditTrail:
    """The writer (one per service; thread-safe)."""

    def __init__(self, state_dir: Path, reveal_uids: bool = False, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(state_dir) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hasher = Hasher(state_dir, reveal_uids)
        self.max_bytes = int(max_bytes)
        self.lock = threading.Lock()
        self.failures = 0
        self.seq, self.last = self._tail()
        self.fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.folder / ACTIVE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        fsync_dir(self.folder)
        return fd

    def _tail(self) -> tuple[int, str]:
        """(last sequence number, last hash); a torn last line (power loss mid-write) is cut off and reported."""
        for path in reversed(trail_files(self.folder)):
            with path.open("r+b") as fh:
                size = fh.seek(0, os.SEEK_END)
                start = max(0, size - TAIL_BYTES)
                fh.seek(start)
                data = fh.read()
                if data and not data.endswith(b"\n"):
                    keep = data.rfind(b"\n") + 1
                    fh.truncate(start + keep)
                    os.fsync(fh.fileno())
                    log.error("audit trail %s ended in a partial line (%d bytes): cut off", path.name,
                              len(data) - keep, extra={"event": "audit_torn_line"})
                    data = data[:keep]
            lines = data.splitlines()
            if lines:
                last = json.loads(lines[-1])
                return int(last["seq"]), str(last["hash"])
        return 0, GENESIS

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def _rotate(self) -> None:
        os.close(self.fd)
        first = 1
        with (self.folder / ACTIVE).open("rb") as fh:
            head = fh.readline()
        with contextlib.suppress(ValueError, KeyError):
            first = int(json.loads(head)["seq"])
        os.replace(self.folder / ACTIVE, self.folder / f"audit.{first:012d}.jsonl")
        self.fd = self._open()

    def record(self, event: str, **fields: Any) -> None:
        """Append one event (``None`` fields are left out); never raises."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        try:
            with self.lock:
                if self.fd < 0:
                    return
                entry = {"seq": self.seq + 1, "time": now, "event": event,
                         **{k: v for k, v in fields.items() if v is not None}, "prev": self.last}
                entry["hash"] = line_hash(entry)
                line = _canonical(entry) + b"\n"
                if self.max_bytes > 0 and os.fstat(self.fd).st_size + len(line) > self.max_bytes \
                        and os.fstat(self.fd).st_size > 0:
                    self._rotate()
                size = os.fstat(self.fd).st_size
                try:
                    if os.write(self.fd, line) != len(line):
                        raise OSError(28, "short write (disk full?)")
                    os.fsync(self.fd)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(self.fd, size)  # no partial line: the chain stays verifiable
                    raise
                self.seq, self.last = entry["seq"], entry["hash"]
        except (OSError, TypeError, ValueError) as exc:
            self.failures += 1
            log.error("could not write the audit trail (%s)", exc, extra={"event": "audit_write_failed"})


# --- the service's trail (module level, like the metrics: every thread records through it) --------------------
_trail: AuditTrail | None = None


def open_trail(state_dir: Path, reveal_uids: bool = False, max_bytes: int = DEFAULT_MAX_BYTES) -> AuditTrail:
    global _trail
    _trail = AuditTrail(state_dir, reveal_uids, max_bytes)
    return _trail


def close_trail() -> None:
    global _trail
    trail, _trail = _trail, None
    if trail is not None:
        trail.close()


def enabled() -> bool:
    return _trail is not None


def record(event: str, **fields: Any) -> None:
    """Append an event to the service's trail (a no-op when none is open). ``sop``/``study`` are UIDs in
    clear: they are hashed here unless the site opted in; ``path`` becomes the file's reference."""
    trail = _trail
    if trail is None:
        return
    for name in ("sop", "study"):
        if name in fields:
            fields[name] = trail.hasher.uid(fields[name])
    path = fields.pop("path", None)
    if path is not None and "file" not in fields:
        fields["file"] = trail.hasher.file_ref(Path(path))
    trail.record(event, **fields)


# --- reading: verify and show ---------------------------------------------------------------------------------
@dataclass
class Problem:
    """Where the chain first breaks."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def iter_entries(folder: Path) -> Iterator[tuple[Path, int, bytes]]:
    for path in trail_files(folder):
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, 1):
                yield path, number, raw


def verify(folder: Path) -> tuple[int, Problem | None]:
    """Check the whole chain, in order; returns (lines checked, the first problem or ``None``)."""
    prev, seq, checked = GENESIS, 0, 0
    first = True
    for path, number, raw in iter_entries(folder):
        if not raw.endswith(b"\n"):
            return checked, Problem(path, number, "partial line (no newline)")
        try:
            entry = json.loads(raw)
            stored, claimed_prev, line_seq = entry["hash"], entry["prev"], int(entry["seq"])
        except (ValueError, KeyError, TypeError):
            return checked, Problem(path, number, "not a JSON audit record")
        if line_hash(entry) != stored:
            return checked, Problem(path, number, "hash does not match the line's content (line altered)")
        if first and line_seq != 1:
            return checked, Problem(path, number, f"the trail starts at sequence number {line_seq}: its first "
                                    "file(s) are missing")
        first = False
        if claimed_prev != prev:
            return checked, Problem(path, number, "does not chain to the line before (line removed, inserted or "
                                    "reordered, or a file is missing)")
        if line_seq != seq + 1:
            return checked, Problem(path, number, f"sequence number {line_seq}, expected {seq + 1}")
        prev, seq = stored, line_seq
        checked += 1
    return checked, None


def find(folder: Path, files: Iterable[str] = (), shas: Iterable[str] = (),
         sops: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Every event about a file reference, a content hash or a SOP UID (in the trail's form), and -- following
    the links -- about the other references and hashes of the same file or instance."""
    wanted_files, wanted_shas, wanted_sops = set(files), set(shas), set(sops)
    entries = []
    for _, _, raw in iter_entries(folder):
        with contextlib.suppress(ValueError):
            entries.append(json.loads(raw))
    def about(e: dict[str, Any]) -> bool:
        return e.get("file") in wanted_files or e.get("sha256") in wanted_shas or e.get("sop") in wanted_sops

    for _ in range(3):  # receive -> (file, sha) -> process -> sop -> other files of the same instance
        before = (len(wanted_files), len(wanted_shas), len(wanted_sops))
        for e in entries:
            if about(e):
                wanted_files.update([e["file"]] if e.get("file") else [])
                wanted_shas.update([e["sha256"]] if e.get("sha256") else [])
                wanted_sops.update([e["sop"]] if e.get("sop") else [])
        if (len(wanted_files), len(wanted_shas), len(wanted_sops)) == before:
            break
    return [e for e in entries if about(e)]


def describe(entry: dict[str, Any]) -> str:
    """One line of ``audit show``."""
    skip = {"seq", "time", "event", "prev", "hash"}
    rest = " ".join(f"{k}={v}" for k, v in entry.items() if k not in skip)
    return f"{entry.get('time')}  {entry.get('event'):<16} {rest}"


def record_backend(status: dict[str, Any], demotions_seen: int) -> int:
    """Audit a backend's state (:meth:`FallbackPredictor.status`): at start-up (``demotions_seen`` < 0) its
    self-test; then each demotion not yet audited, with the new backend's self-test. Returns the demotions
    audited so far."""
    demotions = list(status.get("demotions") or [])
    selftest = status.get("selftest") or {}
    test = {k: selftest.get(k) for k in ("passed", "dice_mean", "dice_min", "n_images", "reason")}
    if demotions_seen < 0:
        record("selftest", backend=status.get("backend"), precision=status.get("precision"),
               fallbacks=len(status.get("fallbacks") or []), **test)
        demotions_seen = 0
    for demotion in demotions[demotions_seen:]:
        record("demotion", **{k: demotion.get(k) for k in ("from", "from_precision", "to", "to_precision",
                                                            "reason")})
        record("selftest", backend=demotion.get("to"), precision=demotion.get("to_precision"), **test)
    return len(demotions)
