"""Inputs the edge runtime must not segment are quarantined with their reason; the run goes on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from edge_helpers import DX_PROCESSING_STORAGE, dicom_bytes, file_ref, make_cr, run_once, save, sc_files, sidecars

UID = "1.2.826.0.1.3680043.10.1082.55."


def bad_inputs(watch: Path) -> dict[str, str]:
    """Write one file per kind of bad input; returns file name -> expected reason code."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset

    expected = {}

    def put(name: str, ds, code: str) -> None:
        save(ds, watch / name)
        expected[name] = code

    (watch / "truncated.dcm").write_bytes(dicom_bytes(make_cr(UID + "1"))[:4000])
    expected["truncated.dcm"] = "unreadable"
    (watch / "report.pdf").write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 8)
    expected["report.pdf"] = "unreadable"

    dicomdir = Dataset()
    dicomdir.file_meta = FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.file_meta.MediaStorageSOPInstanceUID = UID + "2"
    dicomdir.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    dicomdir.FileSetID = "TEST"
    dicomdir.DirectoryRecordSequence = []
    put("DICOMDIR", dicomdir, "dicomdir")

    no_pixels = make_cr(UID + "3")
    del no_pixels.PixelData
    put("no_pixels.dcm", no_pixels, "no_pixel_data")

    rgb = make_cr(UID + "4")
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated, rgb.BitsStored, rgb.HighBit = 8, 8, 7
    rgb.PixelData = np.zeros((rgb.Rows, rgb.Columns, 3), np.uint8).tobytes()
    put("colour.dcm", rgb, "rgb")

    multi = make_cr(UID + "5")
    multi.NumberOfFrames = 2
    multi.PixelData = multi.PixelData * 2
    put("multiframe.dcm", multi, "multiframe")

    lateral = make_cr(UID + "6")
    lateral.ViewPosition = "LL"
    put("lateral.dcm", lateral, "lateral_view")

    processing = make_cr(UID + "7")
    processing.SOPClassUID = processing.file_meta.MediaStorageSOPClassUID = DX_PROCESSING_STORAGE
    processing.Modality = "DX"
    processing.PresentationIntentType = "FOR PROCESSING"
    put("for_processing.dcm", processing, "for_processing")

    put("traversal.dcm", make_cr(UID + "9", study_uid="../../outside"), "invalid_uid")

    ct = make_cr(UID + "8")
    ct.Modality = "CT"
    put("ct.dcm", ct, "unsupported_modality")
    return expected


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_bad_inputs_are_quarantined_with_reason_and_valid_ones_processed(tmp_path: Path, tiny_onnx: Path) -> None:
    from lungseg.edge_runtime.ledger import Ledger

    watch, out, state = tmp_path / "watch", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    expected = bad_inputs(watch)
    save(make_cr(UID + "100"), watch / "good.dcm")
    before = snapshot(watch)

    assert run_once(watch, out, tiny_onnx, state=state) == 1  # 1: some inputs quarantined

    assert snapshot(watch) == before  # copy mode never alters the watch folder
    assert [s["source"]["file"] for s in sidecars(out)] == [file_ref(state, watch, "good.dcm")]
    assert not (tmp_path.parent / "outside").exists() and not (tmp_path / "outside").exists()
    assert len(sc_files(out)) == 1
    quarantine = state / "quarantine"
    for name, code in expected.items():
        ref = file_ref(state, watch, name)  # file names never leave the process, references do
        reason = json.loads((quarantine / f"{ref}.reason.json").read_text())
        assert reason["code"] == code, (name, reason)
        assert reason["message"] and reason["time"]
        assert str(tmp_path) not in reason["message"]
        assert (quarantine / ref).read_bytes() == (watch / name).read_bytes()
    ledger = Ledger(state)
    counts = ledger.counts()
    ledger.close()
    assert counts["quarantined"] == len(expected)
    assert counts["quarantined_by_code"]["unreadable"] == 2

    # a second run quarantines nothing twice and writes nothing new
    assert run_once(watch, out, tiny_onnx, state=state) == 0
    assert len(list(quarantine.glob("*.reason.json"))) == len(expected)


def test_quarantine_move_mode_takes_the_file_out_of_the_watch_folder(tmp_path: Path, tiny_onnx: Path) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    lateral = make_cr(UID + "200")
    lateral.ViewPosition = "RL"
    save(lateral, watch / "lat.dcm")
    save(make_cr(UID + "201"), watch / "ok.dcm")
    assert run_once(watch, out, tiny_onnx, quarantine_mode="move") == 1
    assert sorted(p.name for p in watch.iterdir()) == ["ok.dcm"]  # the valid input stays
    ref = file_ref(out / ".lungseg-state", watch, "lat.dcm")
    reason = json.loads((out / "quarantine" / f"{ref}.reason.json").read_text())
    assert reason["code"] == "lateral_view" and reason["mode"] == "move"
    assert (out / "quarantine" / ref).is_file()


def test_quarantine_keeps_same_named_different_files_apart(tmp_path: Path) -> None:
    from lungseg.edge_runtime.ledger import Ledger
    from lungseg.edge_runtime.quarantine import Quarantine

    ledger = Ledger(tmp_path)
    quarantine = Quarantine(tmp_path / "q", "copy", ledger)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x.dcm").write_bytes(b"one")
    (b / "x.dcm").write_bytes(b"two")
    first = quarantine.put(a / "x.dcm", "f-a", "1" * 64, 3, "unreadable", "bad", data=b"one", label="x.dcm")
    second = quarantine.put(b / "x.dcm", "f-b", "2" * 64, 3, "unreadable", "bad", data=b"two", label="x.dcm")
    ledger.close()
    assert first.name == "x.dcm" and second.name == "x-222222222222.dcm"
    assert second.read_bytes() == b"two"
    assert (tmp_path / "q" / "x-222222222222.dcm.reason.json").is_file()


@pytest.mark.parametrize("junk", [b"", b"DICM", b"\x00" * 200])
def test_tiny_junk_is_quarantined_not_fatal(tmp_path: Path, tiny_onnx: Path, junk: bytes) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    (watch / "junk").write_bytes(junk)
    assert run_once(watch, out, tiny_onnx) == 1
    assert (out / "quarantine" / f"{file_ref(out / '.lungseg-state', watch, 'junk')}.reason.json").is_file()
