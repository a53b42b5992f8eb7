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
* at most ``per_host`` established associations per source address, and
  ``max_established`` in all: one more is closed at once (pynetdicom's own
  ``maximum_associations`` is set above the sum, as a backstop: connections just
  evicted may take a moment to end).

Before any of that, :class:`BoundedReads` bounds what a connection can make the
process hold: a PDU declaring more than :data:`MAX_PDU_READ` bytes (pynetdicom would
read it whole, before checking any AE title) is refused unread, and a C-STORE data set
is counted as it arrives and refused past ``max_dataset`` bytes (the receiver's
``max_file_mb``); the data set itself is streamed to a temporary file, not held in memory.
Each command set, once whole, is checked (``check_command``) before pynetdicom decodes it:
the receiver refuses a C-STORE request without a valid Affected SOP Instance UID, which
pynetdicom would otherwise either ignore without an answer or fail on in its reading thread.

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


def _shutdown(association_socket: Any) -> None:
    """End a pynetdicom ``AssociationSocket``'s connection now (its blocking reads return)."""
    sock = getattr(association_socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _shut(assoc: Any) -> None:
    """End the association's connection now."""
    _shutdown(getattr(getattr(assoc, "dul", None), "socket", None))


def _report_closed(reason: str) -> None:
    log.warning("DICOM connection closed: %s", reason.replace("_", " "),
                extra={"event": "scp_connection_closed", "reason": reason})
    metrics.count("refused", reason=reason)


#: the longest PDU read into memory (an A-ASSOCIATE-RQ is a few kB; a P-DATA PDU at most the 16382 bytes we announce)
MAX_PDU_READ = 1 << 20
_P_DATA_TF = 0x04


class BoundedReads:
    """Wraps one association socket's ``recv``: pynetdicom reads a PDU's 6-byte header, then as many bytes as
    the header declares, all into memory and before any AE title is checked. A PDU declaring more than
    ``max_pdu`` bytes is refused before its body is read; the data set of one C-STORE is counted as its
    P-DATA fragments arrive and refused once over ``max_dataset`` bytes (``None``: not counted). A refusal
    shuts the socket (the association ends as a lost connection) and calls ``refused(reason)``."""

    def __init__(self, sock: Any, max_pdu: int, max_dataset: int | None, refused: Any,
                 check_command: Any = None) -> None:
        self._recv, self._sock = sock.recv, sock
        self.max_pdu, self.max_dataset, self.refused = int(max_pdu), max_dataset, refused
        self.check_command = check_command  # (encoded command set) -> a reason to refuse it, or None
        self._pending: tuple[int, int] | None = None  # (PDU type, length) of the header just read
        self._dataset_bytes = 0  # of the message now arriving
        self._command = bytearray()  # the command set now arriving

    def _refuse(self, reason: str) -> bytearray:
        self.refused(reason)
        _shutdown(self._sock)
        return bytearray()  # what a closed connection reads: pynetdicom ends the association

    def __call__(self, nr_bytes: int) -> bytearray:
        header = self._pending
        if header is None or nr_bytes != header[1]:  # a PDU header (6 bytes), not the body announced
            self._pending = None
            data = self._recv(nr_bytes)
            if nr_bytes == 6 and len(data) == 6:
                length = int.from_bytes(bytes(data[2:6]), "big")
                if length > self.max_pdu:
                    return self._refuse("pdu_too_large")
                self._pending = (data[0], length)
            return data
        self._pending = None
        data = self._recv(nr_bytes)
        if header[0] == _P_DATA_TF:
            reason = self._inspect(data)
            if reason is not None:
                return self._refuse(reason)
        return data

    def _inspect(self, body: bytearray) -> str | None:
        """Follow the fragments of a P-DATA-TF body: a reason to refuse the connection, or ``None``.

        Data set fragments are counted against ``max_dataset``; a command set, once whole, goes to
        ``check_command`` before pynetdicom decodes it."""
        at = 0
        while at + 6 <= len(body):
            item = int.from_bytes(bytes(body[at:at + 4]), "big")  # context id + control header + fragment
            control, fragment = body[at + 5], body[at + 6:at + 4 + item]
            at += 4 + item
            if control & 0x01:  # a command fragment (bit 0 set), its last one when bit 1 is set
                self._command += fragment
                if len(self._command) > self.max_pdu:
                    return "invalid_request"
                if control & 0x02:
                    command, self._command = bytes(self._command), bytearray()
                    problem = self.check_command(command) if self.check_command is not None else None
                    if problem:
                        return problem
                continue
            self._dataset_bytes += len(fragment)
            if self.max_dataset is not None and self._dataset_bytes > self.max_dataset:
                return "dataset_too_large"
            if control & 0x02:
                self._dataset_bytes = 0
        return None


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
        self.last_saturated: float | None = None  # monotonic time of the last refusal for want of a slot
        self.max_pdu = MAX_PDU_READ  # BoundedReads: the longest PDU read, and one C-STORE's data set
        self.max_dataset: int | None = None
        self.check_command: Any = None  # (encoded command set) -> a reason to refuse it (the receiver's)

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
        sock = getattr(getattr(event.assoc, "dul", None), "socket", None)
        if sock is not None:  # every PDU bounded before it is read into memory
            sock.recv = BoundedReads(sock, self.max_pdu, self.max_dataset, _report_closed, self.check_command)
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

    def closed(self, event: Any) -> None:
        with self._lock:
            self._conns.pop(id(event.assoc), None)

    # --- the watcher -------------------------------------------------------
    def _close(self, conn: _Conn, reason: str) -> None:
        conn.closing = reason
        if reason in SATURATION:
            self.last_saturated = time.monotonic()
        _report_closed(reason)
        _shut(conn.assoc)

    def _watch(self) -> None:
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            with self._lock:
                for key, conn in list(self._conns.items()):
                    if not conn.assoc.is_alive() and now - conn.opened > 1.0:  # ended without EVT_CONN_CLOSE
                        self._conns.pop(key, None)
                    elif conn.closing in ("host_limit", "local_limit"):
                        self._close(conn, conn.closing)
                        conn.closing = "closed"
                    elif conn.closing is not None:
                        continue
                    elif not conn.established and now - conn.opened > self.handshake_seconds:
                        self._close(conn, "handshake_timeout")
                    elif conn.established and now - conn.opened > self.association_seconds:
                        self._close(conn, "association_deadline")
