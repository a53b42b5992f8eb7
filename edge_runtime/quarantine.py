"""Quarantine: inputs that cannot (or must not) be processed, kept with the reason.

``<quarantine>/<ref>`` is a copy of the input (``copy`` mode, the default: the
watch folder is never altered; ``move`` mode then removes the input; a file the
receiver wrote is always moved: it is this box's own, not the device's), and
``<quarantine>/<ref>.reason.json`` says why::

    {"code": "lateral_view", "message": "...", "time": "2025-...Z",
     "source": "f-0123456789abcdef", "sha256": "...", "size": 123, "mode": "copy"}

``<ref>`` is the file's reference (:mod:`~lungseg.edge_runtime.names`), not its name,
unless names are revealed by configuration. The copy is written from the bytes the
daemon read itself (opened without following links), so nothing outside the watch
folder is ever copied. A name already taken by different content gets
``-<sha256 prefix>`` before its suffix.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from pathlib import Path

from lungseg.edge_runtime import audit
from lungseg.edge_runtime.fsio import atomic_write_bytes
from lungseg.edge_runtime.ledger import Ledger

log = logging.getLogger(__name__)

REASON_SUFFIX = ".reason.json"


class Quarantine:
    def __init__(self, folder: Path, mode: str, ledger: Ledger):
        self.folder = Path(folder)
        self.mode = mode
        self.ledger = ledger

    def _target(self, label: str, sha: str) -> Path:
        label = Path(label).name or "input"
        target = self.folder / label
        if target.exists() or (self.folder / (target.name + REASON_SUFFIX)).exists():
            stem, dot, suffix = label.partition(".")
            target = self.folder / f"{stem}-{sha[:12]}{dot}{suffix}"
        return target

    def put(self, path: Path, name: str, sha: str, size: int, code: str, message: str,
            data: bytes | None = None, label: str | None = None, move: bool = False) -> Path:
        """Keep the input (``data``, the bytes read from ``path``) and its reason, then record it in the ledger.

        ``name`` is the ledger key of the file, ``label`` what the quarantine calls it (default ``name``).
        ``move``: remove ``path`` once its bytes are kept, whatever the mode (a file this box wrote itself,
        such as the receiver's: a copy would only double its disk use).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        label = label or name
        target = self._target(label, sha)
        kept = data is not None
        if data is not None:
            atomic_write_bytes(target, data)
            if self.mode == "move" or move:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # unlink never follows a link
        reason = {
            "code": code,
            "message": message,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": label,
            "file_ref": name,
            "sha256": sha,
            "size": size,
            "mode": "move" if move and kept else self.mode,
            "kept": kept,
        }
        atomic_write_bytes(self.folder / (target.name + REASON_SUFFIX),
                           (json.dumps(reason, indent=2, ensure_ascii=False) + "\n").encode())
        self.ledger.record_quarantine(sha256=sha, name=name, size=size, code=code)
        audit.record("quarantine", file=name, sha256=sha, outcome="quarantined", code=code,
                     mode="move" if move and kept else self.mode,
                     kept=kept)
        return target


def list_reasons(folder: Path) -> list[dict]:
    """Every ``*.reason.json`` in a quarantine folder (for ``lungseg-edge status``)."""
    out = []
    for path in sorted(Path(folder).glob(f"*{REASON_SUFFIX}")):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            out.append(json.loads(path.read_text()))
    return out
