"""systemd's notify protocol in a few lines: datagrams to ``$NOTIFY_SOCKET`` (no dependency).

Used with ``Type=notify`` and ``WatchdogSec=``: ``READY=1`` once the model is loaded
and the watch is on, ``WATCHDOG=1`` from the main loop (so a hung loop gets the
service restarted), ``STATUS=...`` for ``systemctl status``, ``STOPPING=1`` on shutdown.
Outside systemd every call is a cheap no-op.
"""

from __future__ import annotations

import os
import socket
import time


def notify(message: str) -> bool:
    """Send one notify message; ``False`` when not under systemd or the send failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def extend_start_timeout(status: str, seconds: float = 60.0) -> bool:
    """Ask systemd for ``seconds`` more to finish starting (``EXTEND_TIMEOUT_USEC``), with a status line.

    The TensorRT engine build calls this every 20 s through ``BackendOptions.build_keepalive``.
    """
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}\nSTATUS={status}")


def watchdog_period() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or ``None`` if not asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(usec) / 1e6 / 2)
    except ValueError:
        return None


class Notifier:
    """Rate-limited watchdog pings plus status lines."""

    def __init__(self) -> None:
        self.period = watchdog_period()
        self._last = 0.0

    def ready(self, status: str) -> None:
        notify(f"READY=1\nSTATUS={status}")
        self._last = time.monotonic()

    def status(self, status: str) -> None:
        notify(f"STATUS={status}")

    def ping(self) -> None:
        if self.period is None:
            return
        now = time.monotonic()
        if now - self._last >= self.period:
            notify("WATCHDOG=1")
            self._last = now

    def stopping(self) -> None:
        notify("STOPPING=1\nSTATUS=stopping")
