"""The receiver's modality list: which sender (AE title, from which host, optionally which port) may store.

An entry of ``scp_allow`` is ``AET`` (that calling AE title from any host), ``AET@host``
or ``AET@host:port`` (IPv6: ``AET@[fd00::5]:104``); ``host`` is an IP address or a name,
resolved when the receiver starts. As Orthanc's ``DicomCheckModalityHost``, a calling
AE title is only accepted from the host (and port) its entry names: a device on the
ward that copies a modality's AE title from another address is refused.

A receiver bound to anything but loopback needs a list whose every entry names its host,
or the explicit ``scp_accept_any = true`` (:func:`network_bind_problem`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger("lungseg.edge.receiver")

LOOPBACK_NAMES = ("localhost",)


class ModalityError(ValueError):
    """An ``scp_allow`` entry that is not ``AET``, ``AET@host`` or ``AET@host:port``."""


def _valid_title(title: str) -> bool:
    return 0 < len(title) <= 16 and title.isascii() and title.isprintable() and "\\" not in title \
        and bool(title.strip())


def _address(text: str) -> str | None:
    """``text`` as a normalised IP address (IPv4-mapped IPv6 as IPv4), or ``None`` if it is a name."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


@dataclass(frozen=True)
class Modality:
    """One allowed sender: its calling AE title, and the host and port it must come from (``None``: any)."""

    ae: str
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, entry: str) -> Modality:
        """``AET``, ``AET@host`` or ``AET@host:port`` (raises :class:`ModalityError`)."""
        title, at, rest = str(entry).partition("@")
        title = title.strip()
        if not _valid_title(title):
            raise ModalityError(f"scp_allow entry {entry!r}: the AE title must be 1-16 printable ASCII characters")
        if not at:
            return cls(title)
        host, port_text = rest.strip(), ""
        if host.startswith("["):  # [IPv6]:port
            host, _, tail = host[1:].partition("]")
            port_text = tail[1:] if tail.startswith(":") else tail
        elif host.count(":") == 1:
            host, port_text = host.split(":")
        if not host or any(c.isspace() for c in host):
            raise ModalityError(f"scp_allow entry {entry!r}: no host after '@'")
        port = None
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ModalityError(f"scp_allow entry {entry!r}: {port_text!r} is not a TCP port")
            port = int(port_text)
        return cls(title, host, port)

    def __str__(self) -> str:
        if self.host is None:
            return self.ae
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae}@{host}" + (f":{self.port}" if self.port is not None else "")


def parse_modalities(entries: Iterable[str]) -> list[Modality]:
    """Every entry parsed (raises :class:`ModalityError` on the first bad one); blank entries are skipped."""
    return [Modality.parse(e) for e in entries if str(e).strip()]


def is_loopback(bind: str) -> bool:
    """Whether a listening address reaches this machine only."""
    if bind.strip().lower() in LOOPBACK_NAMES:
        return True
    address = _address(bind.strip())
    return address is not None and ipaddress.ip_address(address).is_loopback


def network_bind_problem(bind: str, entries: Sequence[str], accept_any: bool) -> str | None:
    """Why a receiver on ``bind`` with this allow-list is a configuration error, or ``None`` when it is fine."""
    if accept_any or is_loopback(bind):
        return None
    modalities = parse_modalities(entries)
    if not modalities:
        return (f"scp_bind = {bind!r} listens on the network with no modality list: list the senders in "
                "scp_allow (\"AET@host\" or \"AET@host:port\"), or set scp_accept_any = true to accept any sender")
    open_titles = [m.ae for m in modalities if m.host is None]
    if open_titles:
        return (f"scp_bind = {bind!r} listens on the network and scp_allow names no host for "
                f"{', '.join(open_titles)}: write \"AET@host\" (the modality's address), or set "
                "scp_accept_any = true to accept those titles from any host")
    return None


class ModalityList:
    """The allowed senders, with their hosts resolved to addresses once (at :meth:`resolve`)."""

    def __init__(self, modalities: Sequence[Modality]) -> None:
        self.modalities = list(modalities)
        self._addresses: dict[Modality, set[str]] = {}

    @property
    def titles(self) -> list[str]:
        return sorted({m.ae for m in self.modalities})

    @property
    def checks_hosts(self) -> bool:
        return any(m.host is not None for m in self.modalities)

    def resolve(self) -> None:
        """Resolve every named host now (a name that does not resolve matches nothing, with a warning)."""
        for modality in self.modalities:
            if modality.host is None:
                continue
            direct = _address(modality.host)
            if direct is not None:
                self._addresses[modality] = {direct}
                continue
            try:
                infos = socket.getaddrinfo(modality.host, None, proto=socket.IPPROTO_TCP)
            except OSError as exc:
                log.warning("scp_allow: the host of %s does not resolve (%s); it matches no sender", modality,
                            exc.strerror or exc, extra={"event": "scp_modality_unresolved"})
                self._addresses[modality] = set()
                continue
            self._addresses[modality] = {a for info in infos if (a := _address(str(info[4][0]))) is not None}

    def allows(self, ae: str, address: str, port: int | None) -> bool:
        """Whether a sender calling as ``ae`` from ``address:port`` is on the list (an empty list allows all)."""
        if not self.modalities:
            return True
        title, peer = ae.strip(), _address(str(address)) or str(address)
        for modality in self.modalities:
            if modality.ae != title:
                continue
            if modality.host is None:
                return True
            if modality not in self._addresses:
                self.resolve()
            if peer in self._addresses.get(modality, set()) and modality.port in (None, port):
                return True
        return False
