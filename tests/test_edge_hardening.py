"""Regression tests for inputs and situations that used to crash, hang, loop, leak or lose files.

Every test uses real files, real processes and the real decoders; each one names the
defect it guards against.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from edge_helpers import dicom_bytes, file_ref, make_cr, run_once, save, sc_files, sidecars

UID = "1.2.826.0.1.3680043.10.1082.111."


# --- poison inputs ---------------------------------------------------------------------------------------
def rle_panic_bytes(sop_uid: str) -> bytes:
    """A 64x64 RLE file whose first segment decodes one run too long: pylibjpeg-rle panics (BaseException)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    ds = make_cr(sop_uid, size=64)
    header = struct.pack("<16I", 2, 64, 64 + 66, *([0] * 13))
    fragment = header + b"\x81\x10" * 33 + b"\x81\x20" * 32
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    return dicom_bytes(ds)


def unknown_vr_bytes(sop_uid: str) -> bytes:
    """StudyInstanceUID written with the VR ``ZZ`` (pydicom raises NotImplementedError on access)."""
    data = dicom_bytes(make_cr(sop_uid, size=64))
    at = data.find(b"\x20\x00\x0d\x00UI")
    assert at > 0
    return data[:at + 4] + b"ZZ" + data[at + 6:]


def malformed_modality_bytes(sop_uid: str) -> bytes:
    """Modality (0008,0060) written as a sequence of junk: it cannot be parsed or written back."""
    data = dicom_bytes(make_cr(sop_uid, size=64))
    at = data.find(b"\x08\x00\x60\x00CS")
    assert at > 0
    length = int.from_bytes(data[at + 6:at + 8], "little")
    junk = b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a"
    element = b"\x08\x00\x60\x00SQ\x00\x00" + len(junk).to_bytes(4, "little") + junk
    return data[:at] + element + data[at + 8 + length:]


def bomb_bytes(sop_uid: str, rows: int = 65535, columns: int = 65535, frames: int = 1) -> bytes:
    """A small file whose header claims a huge image (the pixel data itself is tiny)."""
    ds = make_cr(sop_uid, size=64)
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    return dicom_bytes(ds)


def j2k_lying_bytes(sop_uid: str, size: int = 60000) -> bytes:
    """A 64x64 DICOM whose JPEG 2000 code stream's SIZ marker says ``size`` x ``size``."""
    from pydicom.uid import JPEG2000Lossless

    ds = make_cr(sop_uid, size=64)
    ds.compress(JPEG2000Lossless)
    data = bytearray(dicom_bytes(ds))
    at = data.find(b"\xff\x4f\xff\x51")
    assert at > 0
    data[at + 8:at + 16] = struct.pack(">2I", size, size)
    return bytes(data)


def test_poison_inputs_are_quarantined_and_the_rest_of_the_batch_processed(tmp_path: Path, tiny_onnx: Path) -> None:
    """RLE panic, unknown VR, malformed Modality, bombs and a lying J2K code stream once crashed the daemon,
    blew its memory, or were retried forever; the valid files of the same batch got no outputs."""
    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    bad = {
        "rle_panic.dcm": (rle_panic_bytes(UID + "1"), {"decode_error"}),
        "unknown_vr.dcm": (unknown_vr_bytes(UID + "2"), {"malformed_element"}),
        "modality.dcm": (malformed_modality_bytes(UID + "3"), {"malformed_element", "output_error",
                                                               "unsupported_modality"}),
        "bomb.dcm": (bomb_bytes(UID + "4"), {"too_many_pixels"}),
        "frames.dcm": (bomb_bytes(UID + "5", rows=64, columns=64, frames=100_000), {"too_many_frames"}),
        "j2k_siz.dcm": (j2k_lying_bytes(UID + "6"), {"codestream_size_mismatch"}),
    }
    for name, (data, _) in bad.items():
        (watch / name).write_bytes(data)
    for i in range(3):
        save(make_cr(f"{UID}10{i}", index=i, size=64), watch / f"good{i}.dcm")
    t0 = time.monotonic()
    assert run_once(watch, out, tiny_onnx, state=state, batch_size=9) == 1  # 1: quarantined, nothing undone
    assert time.monotonic() - t0 < 60
    assert len(sc_files(out)) == 3
    for name, (_, codes) in bad.items():
        reason = json.loads((state / "quarantine" / f"{file_ref(state, watch, name)}.reason.json").read_text())
        assert reason["code"] in codes, (name, reason)
    # a second run decides nothing again: no crash loop, no retry loop
    assert run_once(watch, out, tiny_onnx, state=state) == 0


def test_worker_hands_pixels_over_shared_memory_or_the_pipe_alike() -> None:
    """Through the shared buffers, or the pipe where a file or image does not fit them, the daemon
    gets the same radiograph as decoding in-process."""
    from lungseg.edge_runtime.isolate import DecodeFailure, DecodeWorker, decode_in_process

    data = dicom_bytes(make_cr(UID + "23", size=300))
    expected = decode_in_process(data, "x", min_side=0)
    sizes = {"shared": (1 << 20, 1 << 20), "file too big": (1000, 1 << 20), "image too big": (1 << 20, 1000),
             "pipe only": (0, 0)}
    for label, buffer_bytes in sizes.items():
        worker = DecodeWorker(timeout_seconds=30, buffer_bytes=buffer_bytes).start()
        assert (worker._buffers is None) == (label == "pipe only")
        try:
            for _ in range(2):  # the buffers are reused from file to file
                got = worker.decode(data, "x", 0)
                assert not isinstance(got, DecodeFailure), (label, got)
                assert np.array_equal(got.pixels, expected.pixels) and got.pixels.flags.writeable, label
                assert got.dataset.SOPInstanceUID == UID + "23" and "PixelData" not in got.dataset
        finally:
            worker.close()


def test_decoder_crash_timeout_and_memory_limit_are_quarantined(tmp_path: Path) -> None:
    """A decoder that dies, hangs or exhausts memory costs one respawn and a reason code, not the daemon."""
    import signal
    import threading

    from lungseg.edge_runtime.isolate import DecodeFailure, DecodeWorker

    big = dicom_bytes(make_cr(UID + "20", size=1024))
    small = dicom_bytes(make_cr(UID + "21", size=64))
    worker = DecodeWorker(timeout_seconds=30).start()
    try:
        assert not isinstance(worker.decode(small, "warm"), DecodeFailure)
        pid = worker.pid
        os.kill(pid, signal.SIGSTOP)  # stopped, the worker cannot finish before the crash, however fast it is

        def crash() -> None:
            os.kill(pid, signal.SIGSEGV)  # pending while stopped: delivered once it runs again
            os.kill(pid, signal.SIGCONT)

        threading.Timer(0.2, crash).start()
        crashed = worker.decode(big * 40, "crash")  # ~80 MB to send: the crash lands mid-request
        assert isinstance(crashed, DecodeFailure) and crashed.code == "decoder_crash", crashed
        assert not isinstance(worker.decode(small, "after-crash"), DecodeFailure)  # respawned
        assert worker.pid != pid
    finally:
        worker.close()

    hung = DecodeWorker(timeout_seconds=0.001).start()
    try:
        hung._wait_ready()
        failure = hung.decode(big, "slow")
        assert isinstance(failure, DecodeFailure) and failure.code == "decoder_timeout"
        hung.timeout_seconds = 30
        assert not isinstance(hung.decode(small, "next"), DecodeFailure)
    finally:
        hung.close()

    from lungseg.dicom_decode import DecodeLimits

    ds = make_cr(UID + "22", size=64)
    ds.Rows, ds.Columns = 8000, 8000
    ds.PixelData = np.zeros((8000, 8000), np.uint16).tobytes()
    huge = dicom_bytes(ds)
    limited = DecodeWorker(DecodeLimits(max_pixels=10**8, max_pixel_bytes=10**9), memory_bytes=700 << 20,
                           timeout_seconds=60).start()
    try:
        failure = limited.decode(huge, "oom")
        assert isinstance(failure, DecodeFailure) and failure.code == "decoder_oom", failure
        assert not isinstance(limited.decode(small, "next"), DecodeFailure)
    finally:
        limited.close()


WARM_WORKER_PROBE = """
import json, sys
from lungseg.edge_runtime.isolate import DecodeFailure, decode_in_process, prepare_worker
prepare_worker(0)  # exactly what the worker does before its first input (no limit here)
before = set(sys.modules)
results = {}
for path in sys.argv[1:]:
    for min_side in (256, 0):
        result = decode_in_process(open(path, "rb").read(), "probe", min_side=min_side)
        results[f"{path.rsplit('/', 1)[-1]}@{min_side}"] = (
            result.code if isinstance(result, DecodeFailure) else list(result.pixels.shape))
print(json.dumps({"results": results, "imported": sorted(set(sys.modules) - before)}))
"""


def test_the_decode_worker_loads_every_decoder_before_its_first_input(tmp_path: Path) -> None:
    """Decoders once loaded on first use, under the worker's memory limit: with a large file in memory
    the import of OpenCV failed ("failed to map segment") and an oversized image was reported as a
    decoder error instead of out of memory; a failed glymur import would have left JPEG 2000
    reduced-resolution decoding off for the worker's life. Every encoding's first decode imports nothing."""
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    paths = []
    for i, syntax in enumerate((None, RLELossless, JPEGLSLossless, JPEG2000Lossless)):
        ds = make_cr(UID + f"4{i}", size=600)
        if syntax is not None:
            ds.compress(syntax)
        paths.append(tmp_path / f"{i}.dcm")
        save(ds, paths[-1])
    probe = subprocess.run([sys.executable, "-c", WARM_WORKER_PROBE, *map(str, paths)], capture_output=True,
                           text=True, timeout=120, check=True)
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["imported"] == [], found["imported"]
    for key, shape in found["results"].items():
        assert isinstance(shape, list) and max(shape) == (300 if key.endswith("@256") else 600), (key, shape)


def test_an_import_that_cannot_map_its_library_is_out_of_memory_not_a_bad_file() -> None:
    from lungseg.edge_runtime.decoding import _out_of_address_space

    try:
        try:
            raise ImportError("libssl-81259c47.so.1.1.1k: failed to map segment from shared object")
        except ImportError as inner:
            raise RuntimeError("decoder plugin failed") from inner
    except RuntimeError as outer:
        assert _out_of_address_space(outer)
    assert not _out_of_address_space(ImportError("No module named 'glymur'"))
    assert not _out_of_address_space(ValueError("failed to map segment"))


def test_poison_content_is_quarantined_after_crashes_not_crash_looped(tmp_path: Path, tiny_onnx: Path) -> None:
    """Content in progress when the daemon died (attempt recorded before decoding) is not retried forever;
    content that only shared a batch with it is processed, alone, and not blamed."""
    import hashlib

    from lungseg.edge_runtime.admission import UNEXPLAINED_DEATHS
    from lungseg.edge_runtime.ledger import Ledger

    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    poison = dicom_bytes(make_cr(UID + "30", size=64))
    bystander = dicom_bytes(make_cr(UID + "32", index=2, size=64))
    (watch / "poison.dcm").write_bytes(poison)
    (watch / "bystander.dcm").write_bytes(bystander)
    save(make_cr(UID + "31", index=1, size=64), watch / "fine.dcm")
    state.mkdir()
    ledger = Ledger(state)
    sha, bystander_sha = hashlib.sha256(poison).hexdigest(), hashlib.sha256(bystander).hexdigest()
    ledger.begin_attempt(bystander_sha, "f-earlier")  # in a batch when a run died: a suspect, not guilty
    ledger.account_unfinished(crashed=True)
    for _ in range(UNEXPLAINED_DEATHS):  # what runs killed (no crash record) with it alone in progress leave behind
        ledger.begin_attempt(sha, "f-earlier")
        ledger.set_solo(sha)
        ledger.account_unfinished(crashed=False)
    ledger.close()
    assert run_once(watch, out, tiny_onnx, state=state) == 1
    reason = json.loads((state / "quarantine" / f"{file_ref(state, watch, 'poison.dcm')}.reason.json").read_text())
    assert reason["code"] == "processing_crash"
    assert len(sc_files(out)) == 2  # the bystander and the fine file
    ledger = Ledger(state)
    assert ledger.attempt(sha) is None and ledger.attempt(bystander_sha) is None
    ledger.close()


# --- fault classification --------------------------------------------------------------------------------
def test_unknown_character_set_is_processed_not_quarantined(tmp_path: Path, tiny_onnx: Path) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    ds = make_cr(UID + "40", size=64)
    ds.SpecificCharacterSet = "ISO_IR 999"
    save(ds, watch / "charset.dcm")
    assert run_once(watch, out, tiny_onnx) == 0
    assert len(sc_files(out)) == 1


def test_quarantined_content_is_not_a_duplicate_of_done(tmp_path: Path, tiny_onnx: Path) -> None:
    """Content quarantined once (e.g. refused by a limit then in force) and sent again is tried again, not skipped."""
    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    data = dicom_bytes(make_cr(UID + "50", size=96))
    (watch / "first.dcm").write_bytes(data)
    assert run_once(watch, out, tiny_onnx, state=state, max_pixels=64 * 64) == 1
    (watch / "resent.dcm").write_bytes(data)
    assert run_once(watch, out, tiny_onnx, state=state) == 0
    assert [s["source"]["file"] for s in sidecars(out)] == [file_ref(state, watch, "resent.dcm")]


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, check=False)
    return result.returncode == 0


def test_once_with_a_full_output_disk_exits_non_zero_and_quarantines_nothing(tmp_path: Path, tiny_onnx: Path) -> None:
    """A full disk is an output fault: not quarantined, not retried forever by --once, and the exit says so."""
    full = tmp_path / "full"
    if shutil.which("mount") is None or not _tmpfs(full, "64k"):
        pytest.skip("mounting a small tmpfs (a real full disk) needs mount permission")
    try:
        watch, state = tmp_path / "watch", tmp_path / "state"
        watch.mkdir()
        for i in range(2):
            save(make_cr(f"{UID}6{i}", index=i, size=256), watch / f"{i}.dcm")
        t0 = time.monotonic()
        assert run_once(watch, full / "out", tiny_onnx, state=state, seg=True) == 6
        assert time.monotonic() - t0 < 60
        assert not (state / "quarantine").exists() or not list((state / "quarantine").iterdir())
        assert not list((full / "out").rglob("*.lungseg-tmp"))
        # room again: the same files are processed by the next run
        assert run_once(watch, tmp_path / "out2", tiny_onnx, state=state) == 0
        assert len(sc_files(tmp_path / "out2")) == 2
    finally:
        subprocess.run(["umount", str(full)], check=False)


# --- links, paths, content changes -----------------------------------------------------------------------------
def test_links_are_never_followed_or_copied(tmp_path: Path, tiny_onnx: Path) -> None:
    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.dcm"
    save(make_cr(UID + "70", size=64), secret)
    (outside / "notes.txt").write_text("not for the state folder\n")
    (watch / "link.dcm").symlink_to(secret)
    (watch / "link-to-text").symlink_to(outside / "notes.txt")
    (watch / "linked-folder").symlink_to(outside, target_is_directory=True)
    save(make_cr(UID + "71", index=1, size=64), watch / "real.dcm")
    assert run_once(watch, out, tiny_onnx, state=state) == 0
    assert [s["source"]["file"] for s in sidecars(out)] == [file_ref(state, watch, "real.dcm")]
    copied = [p for p in state.rglob("*") if p.is_file()] + [p for p in out.rglob("*") if p.is_file()]
    secret_bytes, text = secret.read_bytes(), (outside / "notes.txt").read_bytes()
    assert not any(p.read_bytes() in (secret_bytes, text) for p in copied)


def test_relative_watch_path_with_dotdot_loses_nothing_and_counts_in_batch_duplicates(
        tmp_path: Path, tiny_onnx: Path) -> None:
    """``make demo``'s shape: a relative watch path, files sharing content or SOPInstanceUID in one batch."""
    base = tmp_path / "demo"
    (base / "incoming").mkdir(parents=True)
    (base / "sub").mkdir()
    a = dicom_bytes(make_cr(UID + "80", size=64))
    (base / "incoming" / "a.dcm").write_bytes(a)
    (base / "incoming" / "a-copy.dcm").write_bytes(a)  # same content, same batch
    save(make_cr(UID + "80", index=3, size=64), base / "incoming" / "a-reencoded.dcm")  # same UID, same batch
    save(make_cr(UID + "81", index=1, size=64), base / "incoming" / "b.dcm")
    result = subprocess.run(
        [sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--once", "--watch", "sub/../incoming",
         "--out", "out", "--state", "state", "--model", str(tiny_onnx), "--backend", "cpu", "--log-json",
         "--stable-seconds", "0"], cwd=base, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    stopped = [json.loads(line) for line in result.stderr.splitlines() if '"event": "stopped"' in line][-1]
    assert (stopped["done"], stopped["duplicate"]) == (2, 2), stopped
    assert len(sc_files(base / "out")) == 2


def test_content_replaced_with_same_size_and_mtime_is_processed_again(tmp_path: Path, tiny_onnx: Path) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    first, second = (dicom_bytes(make_cr(f"{UID}9{i}", index=i, size=64)) for i in range(2))
    assert len(first) == len(second)
    path = watch / "same-name.dcm"
    path.write_bytes(first)
    assert run_once(watch, out, tiny_onnx) == 0
    st = path.stat()
    time.sleep(0.02)
    path.write_bytes(second)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert run_once(watch, out, tiny_onnx) == 0
    assert len(sc_files(out)) == 2


# --- state: ledger corruption, hand-deleted outputs, the output lock ----------------------------------------
@pytest.mark.parametrize("damage", ["junk_header", "corrupt_pages"])
def test_corrupt_ledger_is_moved_aside_and_rebuilt(tmp_path: Path, tiny_onnx: Path, damage: str) -> None:
    from lungseg.edge_runtime.ledger import LEDGER_NAME, Ledger

    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    for i in range(3):
        save(make_cr(f"{UID}11{i}", index=i, size=64), watch / f"{i}.dcm")
    (watch / "junk.dcm").write_bytes(b"junk" * 100)
    assert run_once(watch, out, tiny_onnx, state=state) == 1
    first = {p: p.stat().st_mtime_ns for p in sc_files(out)}
    db = state / LEDGER_NAME
    raw = bytearray(db.read_bytes())
    if damage == "junk_header":
        raw[:100] = b"\x00junk" * 20
    else:
        raw[4096:8192] = os.urandom(4096) if len(raw) > 8192 else raw[4096:8192]
        raw[:16] = b"not a database!\x00"
    db.write_bytes(bytes(raw))
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    assert run_once(watch, out, tiny_onnx, state=state) == 0  # keeps running: nothing reprocessed, nothing lost
    assert {p: p.stat().st_mtime_ns for p in sc_files(out)} == first
    assert list(state.glob(f"{LEDGER_NAME}.corrupt-*"))
    ledger = Ledger(state)
    counts = ledger.counts()
    ledger.close()
    assert (counts["instances"], counts["quarantined"]) == (3, 1)


def test_outputs_deleted_by_hand_are_regenerated_by_reprocess(tmp_path: Path, tiny_onnx: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from lungseg.edge_runtime.cli import main

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    for i in range(2):
        save(make_cr(f"{UID}12{i}", index=i, size=64), watch / f"{i}.dcm")
    assert run_once(watch, out, tiny_onnx) == 0
    deleted = sc_files(out)[0]
    deleted.unlink()
    assert run_once(watch, out, tiny_onnx) == 0
    assert not deleted.exists()  # a plain rerun does not second-guess the operator
    capsys.readouterr()
    assert main(["reprocess", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"forgotten": 1}
    assert run_once(watch, out, tiny_onnx) == 0
    assert deleted.is_file() and len(sc_files(out)) == 2


def test_an_output_folder_claimed_by_another_daemon_is_refused(tmp_path: Path, tiny_onnx: Path) -> None:
    from lungseg.edge_runtime.daemon import EXIT_STATE
    from lungseg.edge_runtime.ledger import OutputLock

    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    out.mkdir()
    lock = OutputLock(out).acquire()  # what a daemon with another --state holds
    try:
        assert run_once(watch, out, tiny_onnx, state=tmp_path / "other-state") == EXIT_STATE
    finally:
        lock.release()


# --- lungseg-segment -----------------------------------------------------------------------------------------
def test_segment_reports_bad_inputs_per_file_and_validates_arguments(tmp_path: Path, tiny_onnx: Path,
                                                                      fixture_manifest: Path) -> None:
    from lungseg.data import load_manifest

    good = load_manifest(fixture_manifest)[0].image
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    panic = tmp_path / "panic.dcm"
    panic.write_bytes(rle_panic_bytes(UID + "130"))
    cmd = [sys.executable, "-m", "lungseg.segment", "--model", str(tiny_onnx)]
    result = subprocess.run([*cmd, str(empty), str(folder), str(panic), str(good), "--out", str(tmp_path / "m")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["input"] for line in lines] == [str(empty), str(folder), str(panic), str(good)]
    assert lines[0]["error"] == "empty file"
    assert "directory" in lines[1]["error"] and "not found" not in lines[1]["error"]
    assert all("error" in line for line in lines[:3]) and "mask" in lines[3]
    for threshold in ("5", "-1", "0", "nan"):
        bad = subprocess.run([*cmd, str(good), "--out", str(tmp_path / "m"), "--threshold", threshold],
                             capture_output=True, text=True, timeout=60, check=False)
        assert bad.returncode == 2 and "threshold" in bad.stderr, threshold
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad_out = subprocess.run([*cmd, str(good), "--out", str(blocker / "masks")], capture_output=True, text=True,
                             timeout=60, check=False)
    assert bad_out.returncode == 2 and "Traceback" not in bad_out.stderr and "output" in bad_out.stderr


def test_ledger_never_holds_file_names(tmp_path: Path, tiny_onnx: Path) -> None:
    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    (watch / "DOE_JOHN").mkdir(parents=True)
    save(make_cr(UID + "140", size=64), watch / "DOE_JOHN" / "DOE_JOHN_chest.dcm")
    (watch / "DOE_JOHN" / "DOE_JOHN_junk.dcm").write_bytes(b"junk")
    assert run_once(watch, out, tiny_onnx, state=state) == 1
    db = sqlite3.connect(state / "ledger.sqlite3")
    dump = "\n".join(db.iterdump())
    db.close()
    assert "DOE" not in dump
    assert not [p for p in list(state.rglob("*")) + list(out.rglob("*")) if "DOE" in p.name]
