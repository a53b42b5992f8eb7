"""Test certificates made with the ``openssl`` CLI: a CA, a server and a client certificate, an unrelated CA.

Used by ``tests/test_edge_tls.py`` and ``tests/orthanc_chain.py --tls``. Keys are unencrypted PEM; the
certificates are valid for two days; the server certificate names ``localhost`` and ``127.0.0.1``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

OPENSSL = shutil.which("openssl")


def _openssl(*args: str, cwd: Path) -> None:
    if OPENSSL is None:
        raise FileNotFoundError("the openssl CLI is not installed")
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(folder: Path, name: str) -> None:
    """``<name>.crt`` / ``<name>.key``: a self-signed CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN=lungseg test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def make_leaf(folder: Path, name: str, ca: str, extensions: str) -> None:
    """``<name>.crt`` / ``<name>.key`` signed by the CA ``<ca>.crt``, with the given X.509v3 extensions."""
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


def make_pki(folder: Path) -> Path:
    """ca.crt signs server.crt (localhost, 127.0.0.1) and client.crt; rogue.crt is an unrelated CA."""
    folder.mkdir(parents=True, exist_ok=True)
    make_ca(folder, "ca")
    make_ca(folder, "rogue")
    make_leaf(folder, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
              "extendedKeyUsage=serverAuth,clientAuth\n")
    make_leaf(folder, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return folder
