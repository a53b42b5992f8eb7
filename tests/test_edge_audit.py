"""The audit trail (hash chain, rotation, verify/show) and the disk guard / retention (issue 23)."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path

import pytest
from edge_helpers import associate, make_cr, save

from lungseg.edge_runtime import audit, cli, service_metrics
from lungseg.edge_runtime.config import EdgeConfig
from lungseg.edge_runtime.ledger import Ledger
from lungseg.edge_runtime.retention import DiskGuard, ReceivedFiles, Retention

UID = "1.2.826.0.1.3680043.10.1082.23."
CR = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture
def trail(tmp_path: Path):
    opened = audit.open_trail(tmp_path / "state", max_bytes=2048)
    yield opened
    audit.close_trail()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- the chain --------------------------------------------------------------------------------------------------
def test_rotated_trail_verifies_and_one_edited_line_is_named(tmp_path: Path, trail, capsys) -> None:
    for i in range(60):
        audit.record("process", file=f"f-{i:016x}", sop=f"{UID}{i}", outcome="done")
    audit.close_trail()
    folder = tmp_path / "state" / audit.FOLDER
    files = audit.trail_files(folder)
    assert len(files) >= 3, "2 KB files: 60 events must have rotated"
    assert files[-1].name == audit.ACTIVE
    # the first line of each new file chains to the last hash of the one before
    for older, newer in itertools.pairwise(files):
        last = json.loads(older.read_bytes().splitlines()[-1])
        first = json.loads(newer.read_bytes().splitlines()[0])
        assert first["prev"] == last["hash"] and first["seq"] == last["seq"] + 1
    state = str(tmp_path / "state")
    code, out, _ = run_cli(["audit", "verify", "--state", state], capsys)
    assert code == 0 and "60 line(s)" in out

    rotated = files[1]  # a rotated file, not the active one
    lines = rotated.read_bytes().splitlines(keepends=True)
    edited = json.loads(lines[2])
    edited["outcome"] = "quarantined"  # someone rewrites history, keeping the old hash
    lines[2] = (json.dumps(edited, sort_keys=True, separators=(",", ":")) + "\n").encode()
    rotated.write_bytes(b"".join(lines))
    code, _, err = run_cli(["audit", "verify", "--state", state], capsys)
    assert code == 1
    assert f"{rotated}:3:" in err and "altered" in err
    code, out, _ = run_cli(["audit", "verify", "--state", state, "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["problem"]["file"] == str(rotated) and report["problem"]["line"] == 3

    # recomputing that line's hash does not help: the next line no longer chains to it
    edited["hash"] = audit.line_hash(edited)
    lines[2] = (json.dumps(edited, sort_keys=True, separators=(",", ":")) + "\n").encode()
    rotated.write_bytes(b"".join(lines))
    code, _, err = run_cli(["audit", "verify", "--state", state], capsys)
    assert code == 1 and f"{rotated}:4:" in err and "does not chain" in err


def test_a_deleted_line_or_a_missing_first_file_breaks_the_chain(tmp_path: Path, trail, capsys) -> None:
    for i in range(40):
        audit.record("receive", outcome="stored", sop=f"{UID}{i}")
    audit.close_trail()
    files = audit.trail_files(tmp_path / "state" / audit.FOLDER)
    active = files[-1]
    lines = active.read_bytes().splitlines(keepends=True)
    active.write_bytes(b"".join(lines[:1] + lines[2:]))
    code, _, err = run_cli(["audit", "verify", "--state", str(tmp_path / "state")], capsys)
    assert code == 1 and f"{active}:2:" in err
    active.write_bytes(b"".join(lines))
    files[0].unlink()
    code, _, err = run_cli(["audit", "verify", "--state", str(tmp_path / "state")], capsys)
    assert code == 1 and f"{files[1]}:1:" in err and "missing" in err


def test_threads_writing_at_once_keep_one_unbroken_chain(tmp_path: Path) -> None:
    audit.open_trail(tmp_path / "state", max_bytes=16 << 10)
    try:
        def writer(n: int) -> None:
            for i in range(100):
                audit.record("forward", sop=f"{UID}{n}.{i}", outcome="sent")

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        audit.close_trail()
    checked, problem = audit.verify(tmp_path / "state" / audit.FOLDER)
    assert problem is None and checked == 400


def test_a_torn_last_line_is_cut_off_and_the_chain_continues(tmp_path: Path) -> None:
    audit.open_trail(tmp_path / "state")
    audit.record("start")
    audit.record("selftest", passed=True)
    audit.close_trail()
    active = tmp_path / "state" / audit.FOLDER / audit.ACTIVE
    with active.open("ab") as fh:
        fh.write(b'{"seq":3,"time":"2026-')  # power lost mid-write
    assert audit.verify(active.parent)[1] is not None
    audit.open_trail(tmp_path / "state")
    audit.record("start")
    audit.close_trail()
    checked, problem = audit.verify(active.parent)
    assert problem is None and checked == 3
    assert [json.loads(x)["seq"] for x in active.read_bytes().splitlines()] == [1, 2, 3]


def test_uids_are_keyed_hashes_unless_the_site_opts_in(tmp_path: Path) -> None:
    audit.open_trail(tmp_path / "a")
    audit.record("process", sop=UID + "7", study=UID + "8", path=tmp_path / "Doe_Jane.dcm")
    audit.close_trail()
    text = (tmp_path / "a" / audit.FOLDER / audit.ACTIVE).read_text()
    entry = json.loads(text)
    assert UID not in text and "Doe_Jane" not in text
    hasher = audit.Hasher(tmp_path / "a")
    assert entry["sop"] == hasher.uid(UID + "7") and entry["sop"].startswith("uid:")
    assert entry["file"] == hasher.file_ref(tmp_path / "Doe_Jane.dcm")
    (tmp_path / "other").mkdir()
    assert audit.Hasher(tmp_path / "other").uid(UID + "7") != entry["sop"]  # keyed per install
    audit.open_trail(tmp_path / "b", reveal_uids=True)
    audit.record("process", sop=UID + "7")
    audit.close_trail()
    assert json.loads((tmp_path / "b" / audit.FOLDER / audit.ACTIVE).read_text())["sop"] == UID + "7"


def test_show_follows_a_file_to_its_instance_and_back(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    watch = tmp_path / "watch"
    watch.mkdir()
    received = save(make_cr(UID + "1", size=64), watch / "a.dcm")
    other = save(make_cr(UID + "2", size=64), watch / "b.dcm")
    from lungseg.edge_runtime.fsio import sha256_of

    audit.open_trail(state)
    audit.record("receive", outcome="stored", path=received, sha256=sha256_of(received), sop=UID + "1",
                 calling_ae="PORTABLE1")
    audit.record("process", path=received, sha256=sha256_of(received), sop=UID + "1", outcome="done")
    audit.record("forward", sop=UID + "1", output="sc", outcome="sent")
    audit.record("process", path=other, sop=UID + "2", outcome="done")
    audit.close_trail()
    code, out, _ = run_cli(["audit", "show", "--state", str(state), "--file", str(received), "--json"], capsys)
    events = json.loads(out)["events"]
    assert code == 0 and [e["event"] for e in events] == ["receive", "process", "forward"]
    code, out, _ = run_cli(["audit", "show", "--state", str(state), "--sop", UID + "1"], capsys)
    assert code == 0 and len(out.splitlines()) == 3 and "calling_ae=PORTABLE1" in out
    # a copy elsewhere is found by its content hash
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(received.read_bytes())
    code, out, _ = run_cli(["audit", "show", "--state", str(state), "--file", str(copy)], capsys)
    assert code == 0 and "receive" in out
    code, _, err = run_cli(["audit", "show", "--state", str(state), "--sop", UID + "99"], capsys)
    assert code == 1 and "no audit event" in err


# --- the disk guard ---------------------------------------------------------------------------------------------
class FakeStatVfs:
    """``os.statvfs`` for the given folders only (others raise like the real call); free space settable."""

    def __init__(self, folders: list[Path], total_mb: int, free_mb: float):
        self.folders = {str(f) for f in folders}
        self.total_mb, self.free_mb = total_mb, free_mb
        self.calls = 0

    def __call__(self, path: str) -> os.statvfs_result:
        if str(path) not in self.folders:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        self.calls += 1
        frsize = 4096
        blocks, free = int(self.total_mb * 256), int(self.free_mb * 256)
        return os.statvfs_result((frsize, frsize, blocks, free, free, 1000, 900, 900, 0, 255))


def test_disk_guard_watermark_hysteresis_and_health(tmp_path: Path) -> None:
    fake = FakeStatVfs([tmp_path], total_mb=10_000, free_mb=5_000)
    guard = DiskGuard([tmp_path, tmp_path / "missing"], min_free_mb=512, min_free_percent=2.0, statvfs=fake,
                      interval=0.0)
    assert guard.check() is None
    fake.free_mb = 300  # below 512 MB
    reason = guard.check()
    assert reason is not None and "low disk space" in reason and "300 MB free" in reason
    fake.free_mb = 540  # above the watermark, but not 10 % above it: still low (no flapping)
    assert guard.check() is not None
    fake.free_mb = 600
    assert guard.check() is None
    fake.free_mb = 150  # 1.5 % of 10 GB is above 512 MB? no: 2 % of 10 GB = 200 MB, 512 MB wins; both below
    assert guard.check() is not None
    percent_only = DiskGuard([tmp_path], 0, 2.0, statvfs=FakeStatVfs([tmp_path], 100_000, 1_900), interval=0)
    assert percent_only.check() is not None  # 1.9 % < 2 %
    assert DiskGuard([tmp_path], 0, 0, statvfs=fake).check() is None  # both off: never checked
    # /healthz reports it
    service_metrics.enable(600)
    remove = service_metrics.add_problem_source(guard.check, "disk_low")
    saturated = service_metrics.add_problem_source(lambda: "receiver_saturated: no free slot")  # names its code
    try:
        healthy, body = service_metrics.health()
        assert not healthy and any("low disk space" in p for p in body["problems"])
        assert body["reasons"] == ["disk_low", "receiver_saturated"]
        saturated()
        fake.free_mb = 5_000
        healthy, body = service_metrics.health()
        assert healthy, body
    finally:
        remove()
        service_metrics.disable()


@pytest.mark.integration
def test_receiver_refuses_with_out_of_resources_while_disk_is_low(tmp_path: Path) -> None:
    from lungseg.edge_runtime.receiver import StorageReceiver

    watch = tmp_path / "watch"
    watch.mkdir()
    fake = FakeStatVfs([watch], total_mb=10_000, free_mb=100)
    guard = DiskGuard([watch], 512, 0, statvfs=fake, interval=0.0)
    audit.open_trail(tmp_path / "state")
    scp = StorageReceiver(watch, 0, "LUNGSEG", "127.0.0.1")
    scp.disk_guard = guard.check
    scp.received = ReceivedFiles(tmp_path / "state", audit.Hasher(tmp_path / "state"))
    _, port = scp.start()
    try:
        assoc = associate(port, classes=[CR])
        assert assoc.is_established
        try:
            low = int(assoc.send_c_store(make_cr(UID + "31", size=64)).Status)
            fake.free_mb = 5_000
            ok = int(assoc.send_c_store(make_cr(UID + "32", size=64)).Status)
        finally:
            assoc.release()
    finally:
        scp.stop()
        audit.close_trail()
    assert (low, ok) == (0xA700, 0x0000)
    assert sorted(p.name for p in watch.iterdir()) == [f"{UID}32.dcm"]  # nothing written while low
    events = [json.loads(x) for x in (tmp_path / "state" / audit.FOLDER / audit.ACTIVE).read_text().splitlines()]
    assert events[0]["free_mb"] == 100 and events[0]["minimum_mb"] == 512
    assert [(e["event"], e.get("outcome"), e.get("reason")) for e in events] == [
        ("disk_low", None, None), ("receive", "refused", "disk_low"), ("disk_ok", None, None),
        ("receive", "stored", None)]
    assert ReceivedFiles(tmp_path / "state", audit.Hasher(tmp_path / "state")).load().keys() == {events[-1]["file"]}


# --- retention --------------------------------------------------------------------------------------------------
def test_retention_deletes_only_handled_files_it_owns_and_audits_each(tmp_path: Path) -> None:
    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    for d in (watch, out, state):
        d.mkdir()
    config = EdgeConfig(watch=watch, out=out, state=state, retention_received_days=1, retention_output_days=1,
                        retention_quarantine_days=1, retention_log_days=1).validate()
    hasher = audit.Hasher(state)
    received = ReceivedFiles(state, hasher)
    ledger = Ledger(state)
    old = time.time() - 3 * 86400

    def place(path: Path, data: bytes, handled: bool, from_receiver: bool, age: float = old) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (age, age))
        ref = hasher.file_ref(path)
        import hashlib

        sha = hashlib.sha256(data).hexdigest()
        if from_receiver:
            received.add(path, len(data), sha)
        if handled:
            ledger.remember_path(ref, path.lstat(), sha)
            ledger.record_quarantine(sha256=sha, name=ref, size=len(data), code="test")
        return path

    gone = place(watch / f"{UID}1.dcm", b"a" * 10, handled=True, from_receiver=True)
    waiting = place(watch / f"{UID}2.dcm", b"b" * 10, handled=False, from_receiver=True)  # not processed yet
    young = place(watch / f"{UID}3.dcm", b"c" * 10, handled=True, from_receiver=True, age=time.time())
    device = place(watch / "device.dcm", b"d" * 10, handled=True, from_receiver=False)  # the device's own file
    replaced = place(watch / f"{UID}4.dcm", b"e" * 10, handled=True, from_receiver=True)
    replaced.write_bytes(b"other content")  # the device wrote a file of the same name: not ours any more
    os.utime(replaced, (old, old))
    output = place(out / f"{UID}9" / f"{UID}5.sc.dcm", b"sc", handled=False, from_receiver=False)
    pending = place(out / f"{UID}9" / f"{UID}6.sc.dcm", b"sc", handled=False, from_receiver=False)
    ledger.db.execute("INSERT INTO forward (path, sop_uid, status, attempts, next_try) VALUES (?, ?, 'pending', 0, 0)",
                      (f"{UID}9/{UID}6.sc.dcm", UID + "6"))
    ledger.db.commit()
    quarantined = place(config.quarantine_dir / "f-0000000000000001", b"q", handled=False, from_receiver=False)
    reason = place(config.quarantine_dir / "f-0000000000000001.reason.json",
                   json.dumps({"file_ref": "f-0000000000000001", "sha256": "0" * 64, "code": "x"}).encode(),
                   handled=False, from_receiver=False)
    crash = place(state / "crash.log.1700000000", b"x", handled=False, from_receiver=False)

    audit.open_trail(state)
    try:
        done = Retention(config, ledger, received, hasher).sweep()
    finally:
        audit.close_trail()
        ledger.close()
    assert done == {"received": 1, "watch": 0, "output": 1, "quarantine": 1, "log": 1}
    assert not gone.exists() and not output.exists() and not quarantined.exists() and not reason.exists()
    assert not crash.exists()
    assert waiting.exists() and young.exists() and device.exists() and replaced.exists() and pending.exists()
    events = [json.loads(x) for x in (state / audit.FOLDER / audit.ACTIVE).read_text().splitlines()]
    assert sorted(e["kind"] for e in events if e["event"] == "retention_delete") == [
        "log", "output", "quarantine", "received"]
    assert UID not in json.dumps(events)
    assert hasher.file_ref(gone) not in received.load()  # forgotten once deleted

    # the device's own files only when the site opts in
    opted = EdgeConfig(watch=watch, out=out, state=state, retention_received_days=1,
                       retention_watch_files=True).validate()
    ledger = Ledger(state)
    try:
        done = Retention(opted, ledger, received, hasher).sweep()
    finally:
        ledger.close()
    assert not device.exists() and waiting.exists() and young.exists()
    assert done["watch"] >= 1


def test_free_space_retention_deletes_the_oldest_deletable_files_until_there_is_room(tmp_path: Path) -> None:
    """Below retention_min_free_mb: oldest first, whatever their age, until above it; never a file not yet
    processed or an output not yet delivered."""
    import hashlib

    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    for d in (watch, out, state):
        d.mkdir()
    config = EdgeConfig(watch=watch, out=out, state=state, retention_min_free_mb=700).validate()
    hasher = audit.Hasher(state)
    received = ReceivedFiles(state, hasher)
    ledger = Ledger(state)

    def place(path: Path, days: float, handled: bool = True, ours: bool = True) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = path.name.encode()
        path.write_bytes(data)
        when = time.time() - days * 86400
        os.utime(path, (when, when))
        sha = hashlib.sha256(data).hexdigest()
        if ours:
            received.add(path, len(data), sha)
        if handled:
            ledger.remember_path(hasher.file_ref(path), path.lstat(), sha)
            ledger.record_quarantine(sha256=sha, name=hasher.file_ref(path), size=len(data), code="test")
        return path

    oldest, older = place(watch / f"{UID}71.dcm", 5), place(out / f"{UID}9" / f"{UID}72.sc.dcm", 4, False, False)
    newer = place(watch / f"{UID}73.dcm", 3)
    waiting = place(watch / f"{UID}74.dcm", 9, handled=False)  # the oldest of all, but not processed yet
    pending = place(out / f"{UID}9" / f"{UID}75.sc.dcm", 8, False, False)  # not delivered yet
    ledger.db.execute("INSERT INTO forward (path, sop_uid, status, attempts, next_try) VALUES (?, ?, 'pending', 0, 0)",
                      (f"{UID}9/{UID}75.sc.dcm", UID + "75"))
    ledger.db.commit()
    files = lambda: sum(1 for d in (watch, out) for f in d.rglob("*") if f.is_file())  # noqa: E731
    start = files()

    def statvfs(path: str) -> os.statvfs_result:  # 500 MB free, and 100 MB more for each file deleted
        free = int((500 + 100 * (start - files())) * 256)
        return os.statvfs_result((4096, 4096, 10_000 * 256, free, free, 1000, 900, 900, 0, 255))

    audit.open_trail(state)
    try:
        done = Retention(config, ledger, received, hasher, statvfs=statvfs).sweep()
    finally:
        audit.close_trail()
        ledger.close()
    assert not oldest.exists() and not older.exists()  # 700 MB free after these two: the sweep stops
    assert newer.exists() and waiting.exists() and pending.exists()
    assert done == {"received": 1, "watch": 0, "output": 1, "quarantine": 0, "log": 0}
    events = [json.loads(x) for x in (state / audit.FOLDER / audit.ACTIVE).read_text().splitlines()]
    assert [(e["kind"], e["by"]) for e in events if e["event"] == "retention_delete"] == [
        ("received", "free_space"), ("output", "free_space")]
    from lungseg.edge_runtime.config import ConfigError

    with pytest.raises(ConfigError, match="above disk_min_free_mb"):
        EdgeConfig(watch=watch, out=out, retention_min_free_mb=100).validate()


def test_settings_are_checked() -> None:
    from lungseg.edge_runtime.config import ConfigError

    with pytest.raises(ConfigError, match="disk_min_free_percent"):
        EdgeConfig(watch=Path("w"), out=Path("o"), disk_min_free_percent=100).validate()
    with pytest.raises(ConfigError, match="retention_output_days"):
        EdgeConfig(watch=Path("w"), out=Path("o"), retention_output_days=-1).validate()


def test_self_test_and_each_demotion_are_audited_once(tmp_path: Path) -> None:
    audit.open_trail(tmp_path / "state")
    try:
        status = {"backend": "tensorrt", "precision": "fp16", "fallbacks": [],
                  "selftest": {"passed": True, "dice_min": 0.99}, "demotions": []}
        seen = audit.record_backend(status, -1)
        status = {**status, "backend": "cpu", "precision": "int8", "selftest": {"passed": True, "dice_min": 0.98},
                  "demotions": [{"from": "tensorrt", "from_precision": "fp16", "to": "cpu", "to_precision": "int8",
                                 "reason": "CUDA error"}]}
        seen = audit.record_backend(status, seen)
        assert audit.record_backend(status, seen) == 1  # nothing new: nothing recorded
    finally:
        audit.close_trail()
    events = [json.loads(x) for x in (tmp_path / "state" / audit.FOLDER / audit.ACTIVE).read_text().splitlines()]
    assert [(e["event"], e.get("backend") or e.get("to")) for e in events] == [
        ("selftest", "tensorrt"), ("demotion", "cpu"), ("selftest", "cpu")]
    assert events[1]["reason"] == "CUDA error" and events[2]["dice_min"] == 0.98


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_a_failed_write_is_counted_never_raised_and_leaves_the_chain_intact(tmp_path: Path) -> None:
    trail = audit.open_trail(tmp_path / "state")
    try:
        audit.record("start")
        real_fd = trail.fd
        trail.fd = os.open("/dev/full", os.O_WRONLY | os.O_APPEND)  # every write: ENOSPC, like a full disk
        try:
            audit.record("process", outcome="done")
        finally:
            os.close(trail.fd)
            trail.fd = real_fd
        assert trail.failures == 1 and trail.seq == 1
        audit.record("process", outcome="done")
    finally:
        audit.close_trail()
    checked, problem = audit.verify(tmp_path / "state" / audit.FOLDER)
    assert problem is None and checked == 2
