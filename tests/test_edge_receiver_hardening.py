"""The Storage SCP on the ward network (issue 22): the first acknowledged instance of a UID is kept."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from edge_helpers import associate, make_cr, store_all

UID = "1.2.826.0.1.3680043.10.1082.56."
CR = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture
def receiver(tmp_path: Path):
    from lungseg.edge_runtime.receiver import StorageReceiver

    folder = tmp_path / "watch"
    folder.mkdir()
    scp = StorageReceiver(folder, 0, "LUNGSEG", "127.0.0.1", ["PORTABLE1"])
    scp.conflicts_dir = tmp_path / "quarantine" / "receiver-conflicts"
    _, port = scp.start()
    scp.port = port
    yield scp
    scp.stop()


@pytest.mark.integration
def test_a_different_instance_under_a_stored_uid_is_kept_aside_and_refused(receiver) -> None:
    first, resend, other = make_cr(UID + "1", size=64), make_cr(UID + "1", size=64), make_cr(UID + "1", size=64,
                                                                                             index=1)
    assert first.PixelData != other.PixelData
    final = receiver.folder / f"{UID}1.dcm"
    assert store_all(receiver.port, [first]) == [0x0000]
    stored = final.read_bytes()
    stat = final.stat()
    # an identical resend: success, nothing rewritten; a different instance: Duplicate SOP Instance, first kept
    assert store_all(receiver.port, [resend, other]) == [0x0000, 0x0111]
    assert [p.name for p in receiver.folder.iterdir()] == [final.name]
    assert final.read_bytes() == stored and final.stat().st_ino == stat.st_ino
    first_sha = hashlib.sha256(stored).hexdigest()
    kept = sorted(receiver.conflicts_dir.iterdir())
    assert len(kept) == 2 and kept[0].suffix == ".dcm" and kept[1].name == kept[0].name + ".reason.json"
    assert UID not in kept[0].name  # the file name carries a UID reference, not the UID
    reason = json.loads(kept[1].read_text())
    conflict_sha = hashlib.sha256(kept[0].read_bytes()).hexdigest()
    assert reason["code"] == "duplicate_conflict" and reason["first_sha256"] == first_sha
    assert reason["sha256"] == conflict_sha != first_sha
    from pydicom import dcmread

    assert dcmread(kept[0]).PixelData == other.PixelData
    assert oct(kept[0].stat().st_mode & 0o777) == "0o600"
    # sending the conflicting instance again is refused again and adds nothing
    assert store_all(receiver.port, [other]) == [0x0111]
    assert sorted(receiver.conflicts_dir.iterdir()) == kept


@pytest.mark.integration
def test_file_and_pixel_limits_are_checked_before_success(receiver) -> None:
    from lungseg.dicom_decode import DecodeLimits

    small, big = make_cr(UID + "2", size=32), make_cr(UID + "3", size=64)
    receiver.limits = DecodeLimits(max_pixels=32 * 32)  # 64 x 64 is over it
    assert store_all(receiver.port, [small, big]) == [0x0000, 0xA700]
    assert [p.name for p in receiver.folder.iterdir()] == [f"{UID}2.dcm"]
    size = (receiver.folder / f"{UID}2.dcm").stat().st_size
    receiver.limits = DecodeLimits(max_file_bytes=size + 1)  # 64 x 64 x 2 bytes of pixels is over it
    assert store_all(receiver.port, [big]) == [0xA700]
    many = make_cr(UID + "4", size=32)
    many.NumberOfFrames = 2
    receiver.limits = DecodeLimits(max_frames=1)
    assert store_all(receiver.port, [many]) == [0xA700]
    assert [p.name for p in receiver.folder.iterdir()] == [f"{UID}2.dcm"]
    receiver.limits = DecodeLimits()  # the defaults let it in
    assert store_all(receiver.port, [big]) == [0x0000]


def _garbage(port: int, kind: str):
    """A connection that never completes an association: idle, or a PDU header declaring 1 GB that never comes."""
    import socket
    import struct

    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if kind == "garbage":
        sock.sendall(struct.pack(">BBI", 0x01, 0x00, 1 << 30) + b"\x00\x01" + b"junk" * 8)
    return sock


@pytest.mark.integration
@pytest.mark.robustness
def test_idle_and_garbage_sockets_cannot_lock_out_a_modality(receiver) -> None:
    import time

    socks = [_garbage(receiver.port, "idle") for _ in range(8)] + \
        [_garbage(receiver.port, "garbage") for _ in range(8)]
    try:
        time.sleep(0.5)  # all 16 are open and waiting in the receiver
        t0 = time.monotonic()
        statuses = store_all(receiver.port, [make_cr(UID + "5", size=32)])
        elapsed = time.monotonic() - t0
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [0x0000] and elapsed < 5.0
    assert (receiver.folder / f"{UID}5.dcm").is_file()
    # sockets were evicted for want of a negotiation slot: /healthz says so for a while
    assert receiver.problem() == "receiver_saturated: connections refused for want of a free slot"


@pytest.mark.integration
@pytest.mark.robustness
def test_a_byte_drip_does_not_outlive_the_handshake_deadline(receiver) -> None:
    import time

    receiver.guard.handshake_seconds = 1.0
    sock = _garbage(receiver.port, "garbage")
    sock.settimeout(0.2)
    t0, closed = time.monotonic(), None
    try:
        while time.monotonic() - t0 < 6:
            try:
                sock.sendall(b"x")  # one byte every 0.2 s: each read of pynetdicom's gets something
                if sock.recv(1) == b"":
                    closed = time.monotonic() - t0
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = time.monotonic() - t0
                break
    finally:
        sock.close()
    assert closed is not None and closed < 3.0


def _raw_store(port: int, ds, affected_uid: str) -> int | None:
    """A C-STORE whose command names ``affected_uid`` (the data set says its own); its status, None if none came."""
    import io
    import time

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.dimse_primitives import C_STORE

    assoc = associate(port, classes=[CR], timeout=5)
    assert assoc.is_established
    try:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, ds)  # explicit VR little endian, no file meta: what goes on the wire
        req = C_STORE()
        req.MessageID, req.AffectedSOPClassUID, req.Priority = 1, CR, 2
        req.AffectedSOPInstanceUID = affected_uid
        req.DataSet = io.BytesIO(buffer.getvalue())
        context = assoc.accepted_contexts[0]
        assoc._reactor_checkpoint.clear()  # as send_c_store does: its reactor leaves the answer to us
        assoc.dimse.send_msg(req, context.context_id)
        deadline = time.monotonic() + 5
        # an answer, or an abort (seen in the DUL's queue: the paused reactor would not act on it), or 5 s
        while time.monotonic() < deadline and not assoc.is_aborted and not assoc.acse.is_aborted():
            _, rsp = assoc.dimse.get_msg(block=False)
            if rsp is not None:
                return int(rsp.Status)
            time.sleep(0.02)
        return None
    finally:
        assoc._reactor_checkpoint.set()
        if assoc.is_established:
            assoc.release()


@pytest.mark.integration
def test_command_and_data_set_uids_that_disagree_are_refused(receiver) -> None:
    ds = make_cr(UID + "6", size=32)
    assert _raw_store(receiver.port, ds, UID + "7") == 0xC000
    assert list(receiver.folder.iterdir()) == []
    assert _raw_store(receiver.port, ds, UID + "6") == 0x0000  # the same request, agreeing: stored
    assert [p.name for p in receiver.folder.iterdir()] == [f"{UID}6.dcm"]



@pytest.mark.integration
def test_a_store_request_without_an_affected_uid_is_closed_at_once_not_left_hanging(receiver) -> None:
    """pynetdicom ignores such a request without an answer; the receiver closes its connection within a tick."""
    import time

    ds = make_cr(UID + "8", size=32)
    t0 = time.monotonic()
    assert _raw_store(receiver.port, ds, "") is None  # no status: the connection was closed
    assert time.monotonic() - t0 < 3.0  # not the 5 s the sender would otherwise wait (nor the SCP's 30 s)
    assert list(receiver.folder.iterdir()) == []
    assert store_all(receiver.port, [ds]) == [0x0000]  # the next association is served as usual


@pytest.mark.integration
def test_an_oversized_pdu_and_an_oversized_data_set_are_refused_while_they_arrive(tmp_path: Path) -> None:
    """A PDU header declaring 4 GB is refused before its body is read; a data set over max_file_mb is refused
    as it streams in (never held in memory: it goes to a temporary file); the next sender is served."""
    import socket
    import struct
    import time

    from lungseg.dicom_decode import DecodeLimits
    from lungseg.edge_runtime.receiver import StorageReceiver

    folder = tmp_path / "watch"
    folder.mkdir()
    scp = StorageReceiver(folder, 0, "LUNGSEG", "127.0.0.1", ["PORTABLE1"])
    scp.limits = DecodeLimits(max_file_bytes=200_000)
    _, port = scp.start()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sent, t0 = 0, time.monotonic()
        try:
            sock.sendall(struct.pack(">BBI", 0x01, 0x00, 0xFFFFFFFF))  # an A-ASSOCIATE-RQ of 4 GB
            chunk = b"\0" * (1 << 20)
            while sent < 256 << 20 and time.monotonic() - t0 < 5:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # reset by the receiver: it read the header and closed
            pass
        finally:
            sock.close()
        assert sent < 64 << 20 and time.monotonic() - t0 < 5  # closed at once, not after 256 MB streamed
        big = make_cr(UID + "11", size=512)  # 512 x 512 x 2 bytes: over the 200 kB limit
        with pytest.raises((AssertionError, ValueError, RuntimeError, AttributeError, TypeError)):
            store_all(port, [big])  # the association ends mid-transfer: no status comes back
        assert list(folder.iterdir()) == []
        assert store_all(port, [make_cr(UID + "12", size=64)]) == [0x0000]
    finally:
        scp.stop()
