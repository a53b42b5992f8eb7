"""Optional C-STORE forwarding: outputs reach a real pynetdicom Storage SCP, also after it was down."""

from __future__ import annotations

import socket
from pathlib import Path

import pynetdicom
import pytest
from edge_helpers import make_cr, run_once, save

pytestmark = pytest.mark.integration  # a real Storage SCP on a local port, stopped and restarted

UID = "1.2.826.0.1.3680043.10.1082.44."


class StorageSCP:
    """A Storage SCP that accepts SC, SEG and SR (uncompressed only, so RLE must be decompressed)."""

    def __init__(self, port: int = 0):
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        self.received: list = []
        ae = pynetdicom.AE(ae_title="TESTPACS")
        for sop_class in ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handlers = [(pynetdicom.evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_outputs_are_forwarded_and_retried_after_the_peer_was_down(tmp_path: Path, tiny_onnx: Path) -> None:
    from lungseg.edge_runtime.ledger import Ledger

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    save(make_cr(UID + "1", size=64), watch / "a.dcm")
    port = free_port()
    settings = {"seg": True, "forward_host": "127.0.0.1", "forward_port": port, "forward_ae": "TESTPACS",
                "forward_retry_seconds": 1.0}
    assert run_once(watch, out, tiny_onnx, **settings) == 0  # peer down: queued, not lost
    ledger = Ledger(out / ".lungseg-state")
    assert ledger.counts()["forward_pending"] == 3  # SC, SEG and the SR
    ledger.db.execute("UPDATE forward SET next_try=0")  # skip the backoff wait
    ledger.close()

    scp = StorageSCP(port)
    try:
        save(make_cr(UID + "2", size=64, index=1), watch / "b.dcm")
        assert run_once(watch, out, tiny_onnx, **settings) == 0
    finally:
        scp.close()
    classes = sorted(str(ds.SOPClassUID) for ds in scp.received)
    assert classes == (["1.2.840.10008.5.1.4.1.1.66.4"] * 2 + ["1.2.840.10008.5.1.4.1.1.7"] * 2
                       + ["1.2.840.10008.5.1.4.1.1.88.34"] * 2)
    sources = {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in scp.received
               if ds.SOPClassUID.endswith(".7")}
    assert sources == {UID + "1", UID + "2"}
    ledger = Ledger(out / ".lungseg-state")
    counts = ledger.counts()
    ledger.close()
    assert (counts["forward_sent"], counts["forward_pending"]) == (6, 0)
