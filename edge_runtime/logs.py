"""Logging for the edge runtime: plain text or one JSON object per line, without patient data.

Records never carry patient names or IDs. Files are named by a reference
(:mod:`~lungseg.edge_runtime.names`) unless ``log_file_names`` is set; DICOM UIDs are
logged as a short one-way hash (:func:`uid_ref`) unless ``log_uids`` is set (for sites
whose logs may hold identifiers). Library messages (pydicom, highdicom, Python
warnings) can quote attribute values -- a patient's name, ID, birth date -- so
:class:`PhiFilter` removes every quoted value and anything after ``value``/``:`` from
them, and tracebacks are scrubbed the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import sys

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_reveal_uids = False


def set_reveal_uids(reveal: bool) -> None:
    """Log UIDs in clear (``True``) or as hashes (the default)."""
    global _reveal_uids
    _reveal_uids = bool(reveal)


_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def valid_uid(value: object) -> bool:
    """A DICOM UID: digits and dots, 1 to 64 characters."""
    text = str(value or "")
    return 0 < len(text) <= 64 and _UID.fullmatch(text) is not None


def uid_ref(uid: str | None) -> str | None:
    """A stable, non-reversible reference to a UID for logs (``uid:`` + 16 hex digits)."""
    if not uid:
        return None
    if _reveal_uids:
        return str(uid)
    return "uid:" + hashlib.sha256(str(uid).encode()).hexdigest()[:16]


_QUOTED = re.compile(r"b?'(?:[^'\\\n]|\\.)*'" + r'|b?"(?:[^"\\\n]|\\.)*"')
_AFTER_VALUE = re.compile(r"(?i)(\bvalues?\b[^:'\"\n]*?(?:[:=]|\bis\b|\bof\b)[ \t]*)(\S.*)$", re.MULTILINE)
LIBRARY_LOGGERS = ("py.warnings", "pydicom", "highdicom", "pynetdicom", "PIL", "watchdog")


def scrub(text: str) -> str:
    """``text`` without quoted strings or what follows "value:" -- where library messages put data values."""
    text = _QUOTED.sub("<value>", text)
    return _AFTER_VALUE.sub(lambda m: m.group(1) + "<value>", text)


def scrub_traceback(text: str) -> str:
    """A traceback with its messages scrubbed; the ``File "...", line N`` lines (code locations) kept."""
    return "\n".join(line if line.lstrip().startswith('File "') else scrub(line) for line in text.split("\n"))


class PhiFilter(logging.Filter):
    """Rewrites records of third-party libraries (and warnings) so no attribute value survives."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(LIBRARY_LOGGERS):
            try:
                message = record.getMessage()
            except Exception:  # a broken format string: keep the template only
                message = str(record.msg)
            record.msg, record.args = scrub(message), ()
        return True


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
            obj["exc"] = scrub_traceback(self.formatException(record.exc_info))
        return json.dumps(obj, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return scrub_traceback(super().formatException(ei))

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
    handler.addFilter(PhiFilter())
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
