"""Logging for the edge runtime: plain text or one JSON object per line, without patient data.

Records never carry patient names or IDs. Files are named by their path relative
to the watch folder; DICOM UIDs are logged as a short one-way hash (:func:`uid_ref`)
unless ``log_uids`` is set (for sites whose logs may hold identifiers).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import sys

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_reveal_uids = False


def set_reveal_uids(reveal: bool) -> None:
    """Log UIDs in clear (``True``) or as hashes (the default)."""
    global _reveal_uids
    _reveal_uids = bool(reveal)


def uid_ref(uid: str | None) -> str | None:
    """A stable, non-reversible reference to a UID for logs (``uid:`` + 16 hex digits)."""
    if not uid:
        return None
    if _reveal_uids:
        return str(uid)
    return "uid:" + hashlib.sha256(str(uid).encode()).hexdigest()[:16]


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        obj.update(_extras(record))
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return text


def setup_logging(json_lines: bool = False, verbosity: int = 0, reveal_uids: bool = False) -> None:
    """Configure the root logger on stderr (journald picks it up under systemd)."""
    set_reveal_uids(reveal_uids)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    # third-party chatter stays at WARNING unless -vv
    for noisy in ("watchdog", "highdicom", "pydicom", "pynetdicom", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbosity >= 2 else logging.ERROR)
    # library warnings go through logging (so --log-json stays one object per line); they can
    # quote attribute values, patient names included, so they are only shown with -vv
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbosity >= 2 else logging.ERROR)
