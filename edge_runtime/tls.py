"""DICOM TLS for the receiver (server side) and the forwarder (client side), built from the settings.

Both directions speak TLS 1.2 or newer only, with Python's default cipher list. The receiver

* presents ``scp_tls_cert``/``scp_tls_key`` and, with ``scp_tls_require_client_cert`` (the default),
  refuses any sender without a certificate signed by a CA in ``scp_tls_ca`` (mutual authentication);
  without it, a client certificate is verified against ``scp_tls_ca`` when one is presented;
* does the handshake in the association's own thread, under the association's network timeout, not in
  the accept loop, so a client that connects and sends nothing cannot hold up the other senders.

The forwarder verifies the PACS certificate against ``forward_tls_ca`` (else the system trust store)
and checks its name (DNS or IP subject alternative name) against ``forward_tls_server_name`` (else
``forward_host``); with ``forward_tls_cert``/``forward_tls_key`` it presents a client certificate.
Handshake failures are described by their TLS reason only (e.g. ``certificate verify failed: unable
to get local issuer certificate``): never a UID, never a path.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from lungseg.edge_runtime import service_metrics as metrics
from lungseg.edge_runtime.config import ConfigError, EdgeConfig

log = logging.getLogger("lungseg.edge.tls")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsError(ConfigError):
    """A certificate, key or CA bundle that cannot be used (the message names the setting, file and reason)."""


def describe_tls(exc: BaseException) -> str:
    """A handshake failure for logs and the forward ledger: the TLS reason, never a value from the peer's data."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message or exc.reason or 'rejected'}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: handshake failed: {exc.reason or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"TLS: {exc.strerror}"
    return f"TLS: {type(exc).__name__}"


class _ServerSocket(ssl.SSLSocket):
    """A server-side TLS socket whose failed handshake is logged and counted as a refusal."""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            log.warning("TLS connection refused or broken: %s", describe_tls(exc),
                        extra={"event": "scp_tls_refused"})
            metrics.count("refused", reason="tls")
            raise


class ServerContext(ssl.SSLContext):
    """Defers the server handshake to the first read (in the association thread, under its timeout).

    pynetdicom wraps each accepted socket in its accept loop; a handshake there would block every
    other sender while one client stays silent."""

    sslsocket_class = _ServerSocket

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: Any = None) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=not server_side,
                                   suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
                                   session=session)


class _ClientSocket(ssl.SSLSocket):
    """A client-side TLS socket that notes why its handshake failed on its context (pynetdicom swallows it)."""

    def connect(self, address: Any) -> None:
        context = self.context
        if isinstance(context, ClientContext):
            context.last_error = None
        try:
            super().connect(address)
        except ssl.SSLError as exc:
            if isinstance(context, ClientContext):
                context.last_error = describe_tls(exc)
            raise


class ClientContext(ssl.SSLContext):
    """A client context remembering the last handshake failure (``last_error``, UID-safe)."""

    sslsocket_class = _ClientSocket
    last_error: str | None = None


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path | None, what: str) -> None:
    for path in (cert, key):
        if path is not None and not Path(path).is_file():
            raise TlsError(f"{what}: {path}: no such file")
    try:
        context.load_cert_chain(str(cert), str(key) if key is not None else None)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"{what}: cannot load the certificate {cert} / key {key or cert} "
                       f"({getattr(exc, 'reason', None) or getattr(exc, 'strerror', None) or exc})") from None


def _load_ca(context: ssl.SSLContext, ca: Path, what: str) -> None:
    if not Path(ca).is_file():
        raise TlsError(f"{what}: {ca}: no such file")
    try:
        context.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"{what}: cannot load the CA bundle {ca} "
                       f"({getattr(exc, 'reason', None) or getattr(exc, 'strerror', None) or exc})") from None


def server_context(cert: Path, key: Path | None, ca: Path | None, require_client_cert: bool) -> ServerContext:
    """The receiver's context: our certificate, TLS 1.2+, client certificates verified against ``ca``."""
    if require_client_cert and ca is None:
        raise TlsError("scp_tls_require_client_cert needs scp_tls_ca (the CA that signs the senders' certificates); "
                       "or set scp_tls_require_client_cert = false")
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, cert, key, "scp_tls_cert")
    if ca is not None:
        _load_ca(context, ca, "scp_tls_ca")
    context.verify_mode = (ssl.CERT_REQUIRED if require_client_cert
                           else ssl.CERT_OPTIONAL if ca is not None else ssl.CERT_NONE)
    return context


def client_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ClientContext:
    """The forwarder's context: TLS 1.2+, the peer verified against ``ca`` (else the system store), its name checked."""
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    context.minimum_version = MINIMUM_VERSION
    if ca is not None:
        _load_ca(context, ca, "forward_tls_ca")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        _load_chain(context, cert, key, "forward_tls_cert")
    return context


def receiver_context(config: EdgeConfig) -> ServerContext | None:
    """The receiver's SSL context when ``scp_tls_cert`` is set, else ``None`` (plain DICOM).

    Raises :class:`TlsError` (a configuration error: exit 2) for settings that cannot work together
    or a file that cannot be loaded. Checked here, at start, not in ``EdgeConfig.validate``, which
    must accept each setting on its own."""
    if config.scp_tls_cert is None:
        if config.scp_tls_key is not None or config.scp_tls_ca is not None:
            raise TlsError("scp_tls_key / scp_tls_ca need scp_tls_cert (the receiver's certificate)")
        return None
    return server_context(config.scp_tls_cert, config.scp_tls_key, config.scp_tls_ca,
                          config.scp_tls_require_client_cert)


def forward_tls_args(config: EdgeConfig) -> tuple[ClientContext, str] | None:
    """pynetdicom's ``tls_args`` for the forwarder (context, name to check) when ``forward_tls`` is on."""
    if not config.forward_tls:
        given = (config.forward_tls_ca, config.forward_tls_cert, config.forward_tls_key, config.forward_tls_server_name)
        if any(value is not None for value in given):
            raise TlsError("forward_tls_ca / _cert / _key / _server_name need forward_tls = true")
        return None
    if not config.forward_host:
        return None
    if config.forward_tls_key is not None and config.forward_tls_cert is None:
        raise TlsError("forward_tls_key needs forward_tls_cert (the client certificate)")
    context = client_context(config.forward_tls_ca, config.forward_tls_cert, config.forward_tls_key)
    return context, config.forward_tls_server_name or config.forward_host
