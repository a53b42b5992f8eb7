"""The forwarder's attempt cap, dead letters (log, metric, /healthz, CLI), C-ECHO probe and UID-safe errors.

Real pynetdicom peers on loopback; the ledger is the real SQLite ledger.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pynetdicom
import pytest
from edge_helpers import REPO_ROOT, make_cr, save
from test_edge_forward import free_port

pytestmark = pytest.mark.integration  # real DICOM associations on local ports

UID = "1.2.826.0.1.3680043.10.1082.77."
SC = "1.2.840.10008.5.1.4.1.1.7"
STUDY = UID + "900"


class RefusingSCP:
    """A PACS that answers every C-STORE with 0xA700 (out of resources) and C-ECHO with success."""

    def __init__(self, port: int = 0, status: int = 0xA700):
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        self.stores = 0
        self.status = status
        ae = pynetdicom.AE(ae_title="TESTPACS")
        ae.add_supported_context(SC, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context("1.2.840.10008.1.1")
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(pynetdicom.evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        self.stores += 1
        return self.status

    def close(self) -> None:
        self.server.shutdown()


def _queue(out: Path, ledger, n: int) -> list[str]:
    """``n`` SC outputs on disk and queued, as the pipeline queues them."""
    paths = []
    for i in range(n):
        ds = make_cr(UID + str(i + 1), size=32, index=i)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SC
        ds.StudyInstanceUID = STUDY
        rel = f"{STUDY}/{UID}{i + 1}.sc.dcm"
        (out / STUDY).mkdir(parents=True, exist_ok=True)
        save(ds, out / rel)
        ledger.db.execute("INSERT INTO forward VALUES (?, ?, 'pending', 0, 0, NULL)", (rel, UID + str(i + 1)))
        paths.append(rel)
    return paths


def _forwarder(tmp_path: Path, port: int, max_attempts: int):
    from lungseg.edge_runtime.forward import Forwarder

    return Forwarder(tmp_path / "out", tmp_path / "state", "127.0.0.1", port, "TESTPACS", "LUNGSEG", 1.0,
                     max_attempts)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lungseg.edge_runtime.cli", "forward", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO_ROOT)


def test_a_pacs_refusing_forever_dead_letters_after_the_cap(tmp_path: Path, caplog) -> None:
    from lungseg.edge_runtime import service_metrics as metrics
    from lungseg.edge_runtime.ledger import Ledger

    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger(state)
    paths = _queue(tmp_path / "out", ledger, 2)
    (tmp_path / "out" / paths[1]).write_bytes(b"not DICOM: the error names neither path nor UID")
    scp = RefusingSCP()
    metrics.enable()
    try:
        forwarder = _forwarder(tmp_path, scp.port, max_attempts=3)
        with caplog.at_level(logging.INFO, logger="lungseg.edge"):
            for _ in range(3):
                ledger.db.execute("UPDATE forward SET next_try=0")  # skip the backoff wait
                assert forwarder.send_due(ledger) == 0
        assert scp.stores == 3  # the corrupt one never reached the peer
        assert ledger.forward_due(1e12, 10) == []  # nothing retried forever
        dead = {row["path"]: row for row in ledger.forward_dead()}
        assert set(dead) == set(paths) and all(row["attempts"] == 3 for row in dead.values())
        assert dead[paths[0]]["last_error"] == "C-STORE status 0xA700"
        assert dead[paths[1]]["last_error"] == "InvalidDicomError"
        events = [r for r in caplog.records if getattr(r, "event", "") == "forward_dead_letter"]
        assert len(events) == 2
        for record in caplog.records:  # log_uids is off: no UID, no path, in any message or field
            text = record.getMessage() + json.dumps({k: str(v) for k, v in vars(record).items()})
            assert UID not in text, text
        metrics.set_dead_letters(ledger.forward_dead_count())
        ok, body = metrics.health()
        assert not ok and "dead_letters" in body["reasons"] and body["dead_letters"] == 2
        text = metrics.render().decode()
        assert "lungseg_forward_dead_lettered_total 2.0" in text
        assert 'lungseg_health_problem{reason="dead_letters"} 1.0' in text
    finally:
        metrics.disable()
        scp.close()
        ledger.close()

    listed = _cli("list", "--state", str(state), "--json")
    assert listed.returncode == 1, listed.stderr
    rows = json.loads(listed.stdout)["dead_letters"]
    assert sorted(r["path"] for r in rows) == sorted(paths)
    assert all(r["sop_uid"].startswith("uid:") for r in rows)  # hashed, as in the logs
    retried = _cli("retry", "--state", str(state), "--json", paths[0])
    assert retried.returncode == 0 and json.loads(retried.stdout) == {"queued": 1}
    ledger = Ledger(state)
    try:
        assert [r["path"] for r in ledger.forward_due(1e12, 10)] == [paths[0]]
        assert [r["path"] for r in ledger.forward_dead()] == [paths[1]]
    finally:
        ledger.close()
    assert _cli("list", "--state", str(state)).returncode == 1


def test_missing_output_is_dead_lettered_and_echo_brings_retries_forward(tmp_path: Path) -> None:
    import time

    from lungseg.edge_runtime.ledger import Ledger

    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger(state)
    paths = _queue(tmp_path / "out", ledger, 2)
    (tmp_path / "out" / paths[0]).unlink()  # deleted by hand: retrying cannot help
    port = free_port()
    try:
        forwarder = _forwarder(tmp_path, port, max_attempts=50)
        assert forwarder.send_due(ledger) == 0  # the peer is down
        assert [r["path"] for r in ledger.forward_dead()] == [paths[0]]
        assert [r["attempts"] for r in ledger.forward_dead()] == [1]
        ledger.db.execute("UPDATE forward SET next_try=?", (time.time() + 3600,))  # a long backoff
        assert forwarder.probe(ledger) is False  # down: nothing brought forward
        assert ledger.forward_due(time.time(), 10) == []
        scp = RefusingSCP(port, status=0x0000)
        try:
            forwarder.next_probe = 0.0
            assert forwarder.probe(ledger) is True  # back: C-ECHO answered
            assert [r["path"] for r in ledger.forward_due(time.time(), 10)] == [paths[1]]
            assert forwarder.send_due(ledger) == 1
        finally:
            scp.close()
    finally:
        ledger.close()
