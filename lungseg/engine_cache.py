"""Where TensorRT engines live: a cache in the service's state directory, keyed by everything they depend on.

An engine runs only on the exact device it was built for (an AGX Orin engine is not
an Orin Nano engine, though both report "Orin", 8.7), with the same TensorRT and
from the same ONNX file and build settings. :class:`EngineKey` hashes all of that;
the cache holds ``<root>/<slug>-<digest>/model.engine`` with its
``engine.json`` (the key and the parity record), or ``refused.json`` when the
engine built for that key failed parity. Builds run under an exclusive file lock
so two processes never build the same engine at once. Nothing here writes into a
bundle folder (which may be read-only under the shipped systemd unit).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lungseg.atomic import atomic_write
from lungseg.bundle import ENGINE_FILE, ENGINE_MANIFEST, LEGACY_ENGINE_FILE, sha256_file
from lungseg.cuda_memory import DeviceIdentity

log = logging.getLogger(__name__)

CACHE_ENV = "LUNGSEG_ENGINE_CACHE"
REFUSED = "refused.json"


def default_cache_dir() -> Path:
    """``$LUNGSEG_ENGINE_CACHE``, else ``$STATE_DIRECTORY/engines`` (systemd), else ``~/.cache/lungseg/engines``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "engines"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lungseg" / "engines"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; equal keys mean the engine may be reused."""

    device: DeviceIdentity
    tensorrt_version: str
    onnx_file: str
    onnx_sha256: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device.to_dict(), "tensorrt_version": self.tensorrt_version,
                "onnx_file": self.onnx_file, "onnx_sha256": self.onnx_sha256, "settings": self.settings}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:20]

    def folder_name(self) -> str:
        label = self.device.board or self.device.name
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{label}-sm{self.device.compute_capability}").strip("-")[:60]
        return f"{slug}-trt{self.tensorrt_version}-{self.digest()}"


def differences(recorded: dict[str, Any] | None, key: EngineKey) -> list[str]:
    """Why an ``engine.json`` ``key`` entry does not describe ``key`` (empty: it does)."""
    if not isinstance(recorded, dict):
        return ["no engine key recorded (built by an older lungseg)"]
    here = key.to_dict()
    reasons = []
    for name in ("tensorrt_version", "onnx_file", "onnx_sha256", "settings"):
        if recorded.get(name) != here[name]:
            reasons.append(f"{name}: engine has {recorded.get(name)!r}, here {here[name]!r}")
    for name, value in here["device"].items():
        theirs = (recorded.get("device") or {}).get(name)
        if theirs != value:
            reasons.append(f"device {name}: engine built for {theirs!r}, here {value!r}")
    return reasons


def usable_engine(folder: Path, key: EngineKey) -> tuple[Path, dict[str, Any]] | None:
    """``(engine path, manifest)`` when ``folder`` holds a parity-passed engine for ``key``, else ``None``."""
    engine, manifest_path = folder / ENGINE_FILE, folder / ENGINE_MANIFEST
    if not engine.is_file() and (folder / LEGACY_ENGINE_FILE).is_file():
        engine = folder / LEGACY_ENGINE_FILE
    if not (engine.is_file() and manifest_path.is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); ignoring that engine", manifest_path, exc)
        return None
    reasons = differences(manifest.get("key"), key)
    parity = manifest.get("parity") or {}
    if not parity.get("passed"):
        reasons.append("no passed parity record")
    if manifest.get("engine_sha256") != sha256_file(engine):
        reasons.append("engine file differs from the sha256 in engine.json")
    if reasons:
        log.info("engine in %s not usable here: %s", folder, "; ".join(reasons))
        return None
    return engine, manifest


KEEPALIVE_SECONDS = 20.0  # how often a process waiting on another's build says it is alive


class EngineCache:
    """Engines by :class:`EngineKey` under ``root`` (created on first write)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def folder(self, key: EngineKey) -> Path:
        return self.root / key.folder_name()

    def lookup(self, key: EngineKey) -> tuple[Path, dict[str, Any]] | None:
        return usable_engine(self.folder(key), key)

    def refusal(self, key: EngineKey) -> dict[str, Any] | None:
        """The record of a failed parity check for this key, if any."""
        path = self.folder(key) / REFUSED
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def writable_reason(self) -> str | None:
        """Why engines cannot be stored under ``root`` (``None``: they can)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create the engine cache {self.root}: {exc.strerror or exc}"
        if not os.access(self.root, os.W_OK | os.X_OK):
            return f"the engine cache {self.root} is not writable"
        return None

    @contextlib.contextmanager
    def locked(self, key: EngineKey, keepalive: Callable[[str], object] | None = None,
               every: float = KEEPALIVE_SECONDS) -> Iterator[None]:
        """Exclusive lock for building ``key``. While another process builds it, this waits, calling
        ``keepalive(status)`` every ``every`` seconds (systemd's start timeout is extended as during a build)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / f"{key.folder_name()}.lock"
        with lock_path.open("a+") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("another process is building this engine; waiting for it (%s)", lock_path)
                start = time.monotonic()
                while True:
                    if keepalive is not None:
                        keepalive(f"waiting for another process's TensorRT build ({time.monotonic() - start:.0f} s)")
                    try:
                        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        time.sleep(min(every, 1.0) if keepalive is None else every)
                log.warning("the other build finished after %.0f s", time.monotonic() - start)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def store(self, key: EngineKey, engine: bytes, manifest: dict[str, Any]) -> Path:
        """Write the engine, then its manifest (the manifest last: it is what makes the entry valid)."""
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / ENGINE_FILE, engine)
        (folder / REFUSED).unlink(missing_ok=True)
        full = {**manifest, "key": key.to_dict(), "engine_sha256": hashlib.sha256(engine).hexdigest()}
        atomic_write(folder / ENGINE_MANIFEST, (json.dumps(full, indent=2) + "\n").encode())
        return folder / ENGINE_FILE

    def refuse(self, key: EngineKey, reason: str, details: dict[str, Any]) -> None:
        """Record that the engine for ``key`` failed parity (and remove any engine stored for it)."""
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (ENGINE_FILE, LEGACY_ENGINE_FILE, ENGINE_MANIFEST):
            (folder / name).unlink(missing_ok=True)
        record = {"reason": reason, "key": key.to_dict(), "details": details,
                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write(folder / REFUSED, (json.dumps(record, indent=2, default=str) + "\n").encode())

    def forget_refusal(self, key: EngineKey) -> None:
        (self.folder(key) / REFUSED).unlink(missing_ok=True)


__all__ = ["CACHE_ENV", "REFUSED", "EngineCache", "EngineKey", "default_cache_dir", "differences", "usable_engine"]
