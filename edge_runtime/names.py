"""How files are named in what leaves the process: logs, sidecars, quarantine, the ledger.

Portable units and file shares often name files and folders after the patient, so
by default a file is identified by a *reference*: ``f-`` and 16 hex digits of an
HMAC-SHA256 of its resolved path, keyed with a random secret kept in the state
folder (``name-key``). The same file always gets the same reference on one box,
and a reference cannot be turned back into a name by guessing names. With
``log_file_names`` (for sites whose logs may hold identifiers) the path relative to
the watch folder is used instead. The ledger always keys files by the reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from lungseg.atomic import atomic_write

KEY_NAME = "name-key"


def load_key(state_dir: Path) -> bytes:
    """The install's secret (created on first use, readable by the owner only)."""
    path = Path(state_dir) / KEY_NAME
    with contextlib.suppress(FileNotFoundError):
        key = path.read_bytes()
        if len(key) >= 16:
            return key
    key = secrets.token_bytes(32)
    atomic_write(path, key, mode=0o600)
    return key


class FileNamer:
    """Stable, non-identifying references for input files (see the module docstring)."""

    def __init__(self, state_dir: Path, watch: Path, reveal: bool = False):
        self.key = load_key(state_dir)
        self.watch = Path(watch)
        self.reveal = reveal

    def key_for(self, path: Path) -> str:
        """The ledger key of a (resolved) path: ``f-`` + 16 hex digits of its HMAC (whatever ``reveal`` says)."""
        return "f-" + hmac.new(self.key, os.fsencode(str(path)), hashlib.sha256).hexdigest()[:16]

    def ref(self, path: Path) -> str:
        """What logs, sidecars and quarantine names call this file."""
        if self.reveal:
            try:
                return Path(path).relative_to(self.watch).as_posix()
            except ValueError:
                return Path(path).name
        return self.key_for(path)
