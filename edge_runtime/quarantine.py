"""Quarantine: inputs that cannot (or must not) be processed, kept with the reason.

``<quarantine>/<name>`` is a copy of the input (``copy`` mode, the default: the
watch folder is never altered) or the input itself (``move`` mode), and
``<quarantine>/<name>.reason.json`` says why::

    {"code": "lateral_view", "message": "...", "time": "2025-...Z",
     "source": "incoming/a.dcm", "sha256": "...", "size": 123, "mode": "copy"}

A name already taken by different content gets ``-<sha256 prefix>`` before its suffix.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from pathlib import Path

from lungseg.edge_runtime.fsio import atomic_copy, atomic_write_bytes
from lungseg.edge_runtime.ledger import Ledger

log = logging.getLogger(__name__)

REASON_SUFFIX = ".reason.json"


class Quarantine:
    def __init__(self, folder: Path, mode: str, ledger: Ledger):
        self.folder = Path(folder)
        self.mode = mode
        self.ledger = ledger

    def _target(self, path: Path, sha: str) -> Path:
        target = self.folder / path.name
        if target.exists() or (self.folder / (target.name + REASON_SUFFIX)).exists():
            stem, dot, suffix = path.name.partition(".")
            target = self.folder / f"{stem}-{sha[:12]}{dot}{suffix}"
        return target

    def put(self, path: Path, name: str, sha: str, size: int, code: str, message: str) -> Path:
        """Keep the input and its reason, then record it in the ledger."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self._target(path, sha)
        kept = True
        try:
            atomic_copy(path, target)
            if self.mode == "move":
                os.unlink(path)
        except FileNotFoundError:
            kept = False  # it went away meanwhile; the reason is still worth keeping
        reason = {
            "code": code,
            "message": message,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": name,
            "sha256": sha,
            "size": size,
            "mode": self.mode,
            "kept": kept,
        }
        atomic_write_bytes(self.folder / (target.name + REASON_SUFFIX),
                           (json.dumps(reason, indent=2, ensure_ascii=False) + "\n").encode())
        self.ledger.record_quarantine(sha256=sha, name=name, size=size, code=code)
        return target


def list_reasons(folder: Path) -> list[dict]:
    """Every ``*.reason.json`` in a quarantine folder (for ``lungseg-edge status``)."""
    out = []
    for path in sorted(Path(folder).glob(f"*{REASON_SUFFIX}")):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            out.append(json.loads(path.read_text()))
    return out
