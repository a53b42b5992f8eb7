"""DICOM TLS: the receiver against dcmtk ``storescu +tls``, the forwarder against dcmtk ``storescp +tls``.

Certificates (a CA, a server and a client certificate, and an unrelated CA) are made here with the
``openssl`` CLI; everything listens on 127.0.0.1 only."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pynetdicom
import pytest
from edge_helpers import make_cr, run_once, save
from tls_pki import OPENSSL, make_leaf, make_pki

pytestmark = pytest.mark.integration  # real dcmtk processes and TLS handshakes on local ports

UID = "1.2.826.0.1.3680043.10.1082.77."
STORESCU, STORESCP = shutil.which("storescu"), shutil.which("storescp")
needs_tools = pytest.mark.skipif(not (OPENSSL and STORESCU and STORESCP),
                                 reason="needs the openssl CLI and dcmtk's storescu/storescp (apt install dcmtk)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt signs server.crt (localhost, 127.0.0.1) and client.crt; rogue.crt is an unrelated CA."""
    if not OPENSSL:
        pytest.skip("needs the openssl CLI")
    return make_pki(tmp_path_factory.mktemp("pki"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def tls_receiver(tmp_path: Path, pki: Path):
    from lungseg.edge_runtime.receiver import StorageReceiver
    from lungseg.edge_runtime.tls import server_context

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    receiver = StorageReceiver(incoming, 0, ae_title="LUNGSEG")
    receiver.ssl_context = server_context(pki / "server.crt", pki / "server.key", pki / "ca.crt",
                                          require_client_cert=True)
    _, port = receiver.start()
    yield incoming, port
    receiver.stop()


def storescu(port: int, path: Path, *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run([STORESCU, *tls, "-aec", "LUNGSEG", "-to", "10", "-ta", "10", "-td", "10",
                           "127.0.0.1", str(port), str(path)], capture_output=True, text=True, timeout=60)


@needs_tools
def test_storescu_over_tls_with_a_client_certificate_is_stored_and_plain_is_refused(
        tls_receiver, pki: Path, tmp_path: Path) -> None:
    incoming, port = tls_receiver
    source = save(make_cr(UID + "1", size=64), tmp_path / "a.dcm")
    idle = socket.create_connection(("127.0.0.1", port))  # sends nothing: must not hold up the handshake of others
    try:
        t0 = time.monotonic()
        done = storescu(port, source, "+tls", str(pki / "client.key"), str(pki / "client.crt"), "-pw",
                        "+cf", str(pki / "ca.crt"))
        elapsed = time.monotonic() - t0
    finally:
        idle.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert (incoming / f"{UID}1.dcm").is_file()
    assert elapsed < 5.0, f"the TLS store took {elapsed:.1f} s beside an idle connection"

    plain = storescu(port, save(make_cr(UID + "2", size=64), tmp_path / "b.dcm"))
    assert plain.returncode != 0
    assert not (incoming / f"{UID}2.dcm").exists()


@needs_tools
def test_a_client_certificate_from_another_ca_is_refused_logged_and_counted(
        tls_receiver, pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus-client (the [metrics] extra) counts refusals")
    from lungseg.edge_runtime import service_metrics

    incoming, port = tls_receiver
    make_leaf(pki, "stranger", "rogue", "extendedKeyUsage=clientAuth\n")
    service_metrics.enable()
    try:
        with caplog.at_level("WARNING", logger="lungseg.edge.tls"):
            done = storescu(port, save(make_cr(UID + "3", size=64), tmp_path / "c.dcm"), "+tls",
                            str(pki / "stranger.key"), str(pki / "stranger.crt"), "-pw", "+cf", str(pki / "ca.crt"))
            deadline = time.monotonic() + 5  # the server thread logs after storescu has given up
            while time.monotonic() < deadline and not caplog.records:
                time.sleep(0.05)
        text = (service_metrics.render() or b"").decode()
    finally:
        service_metrics.disable()
    assert done.returncode != 0
    assert not (incoming / f"{UID}3.dcm").exists()
    assert any("certificate verify failed" in r.getMessage() for r in caplog.records), caplog.text
    assert 'lungseg_refused_total{reason="tls"} 1.0' in text


def _echo(port: int, context) -> bool:
    ae = pynetdicom.AE(ae_title="SENDER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGSEG", tls_args=(context, "localhost"))
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    return established


def test_mutual_authentication_refuses_a_client_without_a_certificate(tls_receiver, pki: Path) -> None:
    from lungseg.edge_runtime.tls import client_context

    _, port = tls_receiver
    assert not _echo(port, client_context(pki / "ca.crt"))  # verifies the server, presents nothing
    assert _echo(port, client_context(pki / "ca.crt", pki / "client.crt", pki / "client.key"))


class StoreSCP:
    """dcmtk ``storescp +tls`` on a free local port, writing into ``folder``."""

    def __init__(self, folder: Path, pki: Path, *extra: str):
        self.port = free_port()
        folder.mkdir()
        self.proc = subprocess.Popen(
            [STORESCP, "+tls", str(pki / "server.key"), str(pki / "server.crt"), "-pw", "+cf", str(pki / "ca.crt"),
             *extra, "-aet", "TESTPACS", "-od", str(folder), "-dhl", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # listening once a TCP connect succeeds
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("storescp did not start listening")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def forward_settings(port: int, pki: Path, ca: str) -> dict:
    return {"seg": False, "sr": False, "forward_host": "127.0.0.1", "forward_port": port, "forward_ae": "TESTPACS",
            "forward_tls": True, "forward_tls_ca": pki / ca, "forward_tls_cert": pki / "client.crt",
            "forward_tls_key": pki / "client.key", "forward_retry_seconds": 1.0}


@needs_tools
def test_forwarder_sends_over_mutual_tls_to_storescp(pki: Path, tmp_path: Path, tiny_onnx: Path) -> None:
    from lungseg.edge_runtime.ledger import Ledger

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    save(make_cr(UID + "4", size=64), watch / "a.dcm")
    scp = StoreSCP(tmp_path / "pacs", pki)  # requires our client certificate (dcmtk's default -rc)
    try:
        assert run_once(watch, out, tiny_onnx, **forward_settings(scp.port, pki, "ca.crt")) == 0
    finally:
        scp.close()
    arrived = list((tmp_path / "pacs").iterdir())
    assert len(arrived) == 1 and arrived[0].name.startswith("SC.")
    ledger = Ledger(out / ".lungseg-state")
    counts = ledger.counts()
    ledger.close()
    assert (counts["forward_sent"], counts["forward_pending"]) == (1, 0)


@needs_tools
def test_forwarder_with_the_wrong_ca_fails_with_a_clear_uid_free_error(
        pki: Path, tmp_path: Path, tiny_onnx: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lungseg.edge_runtime.ledger import Ledger

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    save(make_cr(UID + "5", size=64), watch / "a.dcm")
    scp = StoreSCP(tmp_path / "pacs", pki)
    try:
        with caplog.at_level("WARNING", logger="lungseg.edge.forward"):
            assert run_once(watch, out, tiny_onnx, **forward_settings(scp.port, pki, "rogue.crt")) == 0
    finally:
        scp.close()
    assert not list((tmp_path / "pacs").iterdir())
    ledger = Ledger(out / ".lungseg-state")
    rows = ledger.db.execute("SELECT last_error FROM forward").fetchall()
    ledger.close()
    assert len(rows) == 1  # OpenSSL's reason depends on whether the peer sends its CA in the chain (dcmtk does)
    assert rows[0][0] in ("TLS: certificate verify failed: unable to get local issuer certificate",
                          "TLS: certificate verify failed: self-signed certificate in certificate chain")
    failures = [r.getMessage() for r in caplog.records if r.name == "lungseg.edge.forward"]
    assert failures and all("certificate verify failed" in m for m in failures)
    assert not any(UID in m for m in failures)


@needs_tools
def test_forwarder_checks_the_peer_name(pki: Path, tmp_path: Path, tiny_onnx: Path) -> None:
    from lungseg.edge_runtime.ledger import Ledger

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    save(make_cr(UID + "6", size=64), watch / "a.dcm")
    scp = StoreSCP(tmp_path / "pacs", pki)
    try:
        settings = forward_settings(scp.port, pki, "ca.crt") | {"forward_tls_server_name": "pacs.example.org"}
        assert run_once(watch, out, tiny_onnx, **settings) == 0
    finally:
        scp.close()
    assert not list((tmp_path / "pacs").iterdir())
    ledger = Ledger(out / ".lungseg-state")
    error = ledger.db.execute("SELECT last_error FROM forward").fetchone()[0]
    ledger.close()
    assert error.startswith("TLS: certificate verify failed: Hostname mismatch")


def test_tls_settings_that_cannot_work_are_configuration_errors(pki: Path, tmp_path: Path) -> None:
    import ssl

    from lungseg.edge_runtime.config import ConfigError, EdgeConfig
    from lungseg.edge_runtime.tls import TlsError, receiver_context

    base = {"watch": tmp_path / "w", "out": tmp_path / "o"}
    from lungseg.edge_runtime.tls import forward_tls_args

    for settings, message in (
            ({"scp_tls_cert": pki / "server.crt", "scp_tls_key": pki / "server.key"},
             "scp_tls_require_client_cert needs scp_tls_ca"),
            ({"scp_tls_ca": pki / "ca.crt"}, "need scp_tls_cert"),
            ({"forward_host": "127.0.0.1", "forward_tls_ca": pki / "ca.crt"}, "need forward_tls = true"),
            ({"forward_host": "127.0.0.1", "forward_tls": True, "forward_tls_key": pki / "client.key"},
             "forward_tls_key needs forward_tls_cert")):
        config = EdgeConfig(**base, **settings).validate()
        with pytest.raises(ConfigError, match=message):  # TlsError is a ConfigError: exit 2 at start
            receiver_context(config)
            forward_tls_args(config)
    config = EdgeConfig(**base, scp_tls_cert=pki / "server.crt", scp_tls_key=pki / "server.key",
                        scp_tls_ca=pki / "ca.crt").validate()
    context = receiver_context(config)
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    config = EdgeConfig(**base, scp_tls_cert=pki / "server.crt", scp_tls_key=pki / "missing.key",
                        scp_tls_ca=pki / "ca.crt").validate()
    with pytest.raises(TlsError, match=r"missing\.key"):
        receiver_context(config)
    config = EdgeConfig(**base, scp_tls_cert=pki / "server.crt", scp_tls_key=pki / "client.key",
                        scp_tls_ca=pki / "ca.crt").validate()
    with pytest.raises(TlsError, match="scp_tls_cert: cannot load"):  # key of another certificate
        receiver_context(config)


def test_metrics_and_healthz_listen_on_loopback_only_by_default(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    pytest.importorskip("prometheus_client", reason="prometheus-client (the [metrics] extra) serves /metrics")
    from lungseg.edge_runtime import service_metrics, services
    from lungseg.edge_runtime.config import EdgeConfig

    config = EdgeConfig(watch=tmp_path / "w", out=tmp_path / "o", metrics_port=0).validate()
    assert config.metrics_bind == "127.0.0.1"
    services.start_metrics(config)
    try:
        server = service_metrics._server
        assert server is not None
        host, port = server.socket.getsockname()[:2]  # what the kernel bound: reachable from this machine only
        assert host == "127.0.0.1"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:  # 503: not healthy yet, but answered
            status = exc.code
        assert status in (200, 503)
    finally:
        service_metrics.disable()


def test_a_forward_tls_file_that_cannot_be_loaded_stops_the_service_with_exit_2(
        pki: Path, tmp_path: Path, tiny_onnx: Path, caplog: pytest.LogCaptureFixture) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    settings = {"forward_host": "127.0.0.1", "forward_port": free_port(), "forward_tls": True,
                "forward_tls_ca": pki / "no-such-ca.crt"}
    assert run_once(watch, out, tiny_onnx, **settings) == 2
    assert "forward_tls_ca" in caplog.text and "no-such-ca.crt: no such file" in caplog.text


def test_a_receiver_certificate_that_cannot_be_loaded_is_a_service_error(pki: Path, tmp_path: Path) -> None:
    from lungseg.edge_runtime import services
    from lungseg.edge_runtime.config import EdgeConfig

    (tmp_path / "w").mkdir()
    config = EdgeConfig(watch=tmp_path / "w", out=tmp_path / "o", scp_port=0,
                        scp_tls_cert=pki / "missing-server.crt", scp_tls_key=pki / "server.key",
                        scp_tls_ca=pki / "ca.crt").validate()
    with pytest.raises(services.ServiceError, match=r"scp_tls_cert: .*missing-server\.crt: no such file"):
        services.start_receiver(config)
