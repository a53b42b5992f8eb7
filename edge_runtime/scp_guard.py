"""Connection discipline for the Storage SCP: idle, garbage and byte-drip sockets cannot lock a modality out.

pynetdicom reads a PDU with blocking ``recv`` calls whose timeout restarts with
every byte, and counts every open connection against ``maximum_associations``
before it has read an A-ASSOCIATE-RQ. :class:`ConnectionGuard` (bound to
``EVT_CONN_OPEN``, ``EVT_ACCEPTED`` and ``EVT_CONN_CLOSE``) adds what is missing:

* a connection that has not completed association negotiation within
  ``handshake_seconds`` is closed, however many bytes it trickles;
* at most ``pending_cap`` connections may be negotiating at once: a new one closes
  the oldest still negotiating (a real modality sends its A-ASSOCIATE-RQ at once,
  an idle socket never does), so the slots of established associations are never
  taken by sockets that have not said who they are;
* an established association lasts at most ``association_seconds`` in total;
* a connection a handler marks with :meth:`ConnectionGuard.close` (the receiver does for a
  C-STORE request that lacks a valid Affected SOP Instance UID, which pynetdicom would
  otherwise ignore, leaving both ends waiting) is closed within a tick;
* at most ``per_host`` established associations per source address, and
  ``max_established`` in all: one more is closed at once (pynetdicom's own
  ``maximum_associations`` is set above the sum, as a backstop: connections just
  evicted may take a moment to end).

Closing is a ``shutdown`` of the socket, which ends pynetdicom's blocking read
(the association then ends as a lost connection). Each closure is counted in
``lungseg_edge_refused_total`` with its own reason.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from lungseg.edge_runtime import service_metrics as metrics

log = logging.getLogger("lungseg.edge.receiver")


#: closures that mean the receiver had no slot left (all associations or negotiation slots in use)
SATURATION = ("local_limit", "evicted")


@dataclass
class _Conn:
    assoc: Any
    host: str
    opened: float = field(default_factory=time.monotonic)
    established: bool = False
    closing: str | None = None  # the reason it is being closed


def _shut(assoc: Any) -> None:
    """End the association's connection now (its blocking reads return)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class ConnectionGuard:
    """Deadlines, a negotiation pool with eviction, and a per-host cap for the SCP's connections."""

    def __init__(self, pending_cap: int = 8, handshake_seconds: float = 10.0, association_seconds: float = 600.0,
                 per_host: int = 4, max_established: int = 8, tick: float = 0.2):
        self.pending_cap, self.per_host, self.max_established = int(pending_cap), int(per_host), int(max_established)
        self.handshake_seconds, self.association_seconds = float(handshake_seconds), float(association_seconds)
        self.tick = tick
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._deferred = {"host_limit", "local_limit"}  # reasons the watcher closes (set by handlers)
        self.last_saturated: float | None = None  # monotonic time of the last refusal for want of a slot

    def handlers(self) -> list[tuple[Any, Any]]:
        from pynetdicom import evt

        return [(evt.EVT_CONN_OPEN, self.opened), (evt.EVT_ACCEPTED, self.accepted),
                (evt.EVT_CONN_CLOSE, self.closed)]

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="scp-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # --- events ------------------------------------------------------------
    def opened(self, event: Any) -> None:
        host = str((event.address or ("?",))[0])
        with self._lock:
            self._conns[id(event.assoc)] = _Conn(event.assoc, host)
            pending = [c for c in self._conns.values() if not c.established and c.closing is None]
            for conn in sorted(pending, key=lambda c: c.opened)[:max(0, len(pending) - self.pending_cap)]:
                self._close(conn, "evicted")

    def accepted(self, event: Any) -> None:
        with self._lock:
            conn = self._conns.get(id(event.assoc))
            if conn is None:
                return
            conn.established, conn.opened = True, time.monotonic()
            live = [c for c in self._conns.values() if c.established and c.closing is None]
            if len(live) > self.max_established:  # closed by the watcher, not inside pynetdicom's own handler
                conn.closing = "local_limit"
            elif len([c for c in live if c.host == conn.host]) > self.per_host:
                conn.closing = "host_limit"

    def close(self, assoc: Any, reason: str) -> None:
        """Close ``assoc``'s connection soon (from the watcher, within a tick), counted with ``reason``: for
        a handler that runs inside pynetdicom's own threads (e.g. a malformed request seen on receipt)."""
        with self._lock:
            conn = self._conns.get(id(assoc))
            if conn is not None and conn.closing is None:
                conn.closing = reason
                self._deferred.add(reason)

    def closed(self, event: Any) -> None:
        with self._lock:
            self._conns.pop(id(event.assoc), None)

    # --- the watcher -------------------------------------------------------
    def _close(self, conn: _Conn, reason: str) -> None:
        conn.closing = reason
        if reason in SATURATION:
            self.last_saturated = time.monotonic()
        log.warning("DICOM connection closed: %s", reason.replace("_", " "),
                    extra={"event": "scp_connection_closed", "reason": reason})
        metrics.count("refused", reason=reason)
        _shut(conn.assoc)

    def _watch(self) -> None:
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            with self._lock:
                for key, conn in list(self._conns.items()):
                    if not conn.assoc.is_alive() and now - conn.opened > 1.0:  # ended without EVT_CONN_CLOSE
                        self._conns.pop(key, None)
                    elif conn.closing in self._deferred:
                        self._close(conn, conn.closing)
                        conn.closing = "closed"
                    elif conn.closing is not None:
                        continue
                    elif not conn.established and now - conn.opened > self.handshake_seconds:
                        self._close(conn, "handshake_timeout")
                    elif conn.established and now - conn.opened > self.association_seconds:
                        self._close(conn, "association_deadline")
