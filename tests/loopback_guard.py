"""Pytest plugin: the test suite talks to loopback only.

While the suite runs, ``socket.socket.connect``, ``connect_ex``, ``bind`` and ``sendto`` of an
``AF_INET``/``AF_INET6`` socket raise :class:`NonLoopbackSocketError` unless the address is a
loopback address (127.0.0.0/8, ``::1``, ``::ffff:127.x.x.x``) or the name ``"localhost"``. Binding
the wildcard address (``""``, ``0.0.0.0``, ``::``) is refused too, and ``listen`` is refused on any
socket not bound to loopback (one never bound would listen on the wildcard address). One bind
passes: a TCP socket to the wildcard address on port 0, which is what ``connect`` does implicitly
and what pynetdicom does for every association it opens; that socket can neither listen nor
connect anywhere but loopback. ``AF_UNIX`` and other families pass. Other host names are refused
without being resolved.

The error is not an ``OSError``, so code that retries or ignores failed connections does not
swallow it; and every refusal is recorded, so a test whose code caught it anyway still fails.
A refusal outside a test (collection, a session fixture) raises where it happens.

Only this process is guarded: subprocesses a test starts (the edge daemon, ``lungseg-train``
with its Ray processes, DICOM tools) are not covered. Tests of those check what they listen on
themselves (see ``tests/test_train_ray.py``).

Registered by ``pytest_plugins`` in ``tests/conftest.py``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

_GUARDED_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_PATCHED = ("connect", "connect_ex", "bind", "sendto", "listen")
_originals: dict[str, Callable[..., Any]] = {}
_refused: list[str] = []


class NonLoopbackSocketError(RuntimeError):
    """A test opened, bound or connected a socket to an address other than loopback."""


def is_loopback_host(host: object) -> bool:
    """True for ``"localhost"`` and loopback IP literals; False for the wildcard and anything else."""
    if isinstance(host, bytes):
        host = host.decode("ascii", errors="replace")
    if not isinstance(host, str):
        return False
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 scope ("::1%lo")
    except ValueError:
        return False  # a host name other than localhost, or "" (the wildcard)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _check(sock: socket.socket, operation: str, address: object) -> None:
    if sock.family not in _GUARDED_FAMILIES:
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if not is_loopback_host(host):
        message = (f"socket.{operation}({address!r}) on {sock.family.name}: the test suite may only use loopback "
                   "addresses (127.0.0.1, ::1, localhost); see tests/loopback_guard.py")
        _refused.append(message)
        raise NonLoopbackSocketError(message)


def _connect(self: socket.socket, address: object) -> None:
    _check(self, "connect", address)
    return _originals["connect"](self, address)


def _connect_ex(self: socket.socket, address: object) -> int:
    _check(self, "connect_ex", address)
    return _originals["connect_ex"](self, address)


_WILDCARD = ("", "0.0.0.0", "::")


def _client_side_bind(sock: socket.socket, address: object) -> bool:
    """A TCP socket bound to the wildcard address on port 0: what ``connect`` does implicitly.

    pynetdicom binds every association's client socket so (``bind_address=("", 0)``); such a
    socket can reach nothing but what ``connect`` is allowed, and ``listen`` on it is refused.
    """
    return (sock.type == socket.SOCK_STREAM and isinstance(address, tuple) and len(address) >= 2
            and address[0] in _WILDCARD and address[1] == 0)


def _bind(self: socket.socket, address: object) -> None:
    if not _client_side_bind(self, address):
        _check(self, "bind", address)
    return _originals["bind"](self, address)


def _sendto(self: socket.socket, data: bytes, *args: object) -> int:
    if args:  # sendto(data, address) or sendto(data, flags, address)
        _check(self, "sendto", args[-1])
    return _originals["sendto"](self, data, *args)


def _listen(self: socket.socket, *args: object) -> None:
    if self.family in _GUARDED_FAMILIES:  # a socket never bound would listen on the wildcard address
        _check(self, "listen", self.getsockname())
    return _originals["listen"](self, *args)


_REPLACEMENTS = {"connect": _connect, "connect_ex": _connect_ex, "bind": _bind, "sendto": _sendto, "listen": _listen}


def install() -> None:
    """Patch :class:`socket.socket` (idempotent)."""
    if _originals:
        return
    for name in _PATCHED:
        _originals[name] = getattr(socket.socket, name)
        setattr(socket.socket, name, _REPLACEMENTS[name])


def uninstall() -> None:
    for name, original in _originals.items():
        setattr(socket.socket, name, original)
    _originals.clear()


def pytest_configure(config: pytest.Config) -> None:
    install()


def pytest_unconfigure(config: pytest.Config) -> None:
    uninstall()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fail the test if it tried a non-loopback address, even where its code caught the error."""
    _refused.clear()
    result = yield  # a test that failed on its own (the refusal included) is reported as such
    refused, _refused[:] = list(_refused), []
    if refused:
        pytest.fail("non-loopback socket use during the test (the error was caught):\n" + "\n".join(refused),
                    pytrace=False)
    return result
