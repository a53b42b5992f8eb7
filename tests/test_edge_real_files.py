"""The edge runtime on real chest radiograph DICOMs: valid, linked SCs and SEGs equal to the model's mask."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from edge_helpers import SHARED_FILES, dciodvfy_errors, file_ref, run_once, sc_files, shared_dicom_dir, sidecars

from lungseg.edge_runtime.config import EdgeConfig


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path) -> dict:
    """The six real files processed once, with --seg, by the real daemon code."""
    source = shared_dicom_dir()
    root = tmp_path_factory.mktemp("real")
    watch, out = root / "watch", root / "out"
    watch.mkdir()
    for name in SHARED_FILES:
        shutil.copyfile(source / name, watch / name)
    code = run_once(watch, out, tiny_onnx, seg=True)
    names = {file_ref(out / ".lungseg-state", watch, name): name for name in SHARED_FILES}  # logs carry refs
    by_file = {names[s["source"]["file"]]: s for s in sidecars(out)}
    return {"code": code, "out": out, "by_file": by_file, "source": source}


def test_real_run_processes_every_file(real_run: dict) -> None:
    assert real_run["code"] == 0
    assert sorted(real_run["by_file"]) == sorted(SHARED_FILES)
    assert len(sc_files(real_run["out"])) == len(SHARED_FILES)


@pytest.mark.parametrize("name", SHARED_FILES)
def test_real_file_yields_one_valid_linked_sc(real_run: dict, name: str) -> None:
    sidecar = real_run["by_file"][name]
    source = pydicom.dcmread(real_run["source"] / name, force=True, stop_before_pixels=True)
    out: Path = real_run["out"]
    matches = [p for p in sc_files(out) if p.name.startswith(str(source.SOPInstanceUID) + ".")]
    assert len(matches) == 1
    sc_path = matches[0]
    assert sc_path.parent.name == str(source.StudyInstanceUID)
    assert dciodvfy_errors(sc_path) == []
    sc = pydicom.dcmread(sc_path)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert sc.PatientID == source.get("PatientID", "")
    assert sc.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian  # the default sc_syntax
    rgb = sc.pixel_array
    rendered = sidecar["rendered"]  # drawn at the decoded resolution: 1/2**level, short side >= 256 unless native
    assert rgb.shape == (rendered["sc_rows"], rendered["sc_columns"], 3)
    # the overlay shows the source at full resolution (plus a text strip below only if the lungs left no room);
    # the model's input was the reduced decode
    assert (rendered["sc_rows"] - rendered["text_strip_rows"], rendered["sc_columns"]) == (source.Rows, source.Columns)
    assert (rendered["rows"], rendered["columns"]) == (
        -(-source.Rows // 2 ** rendered["decoded_level"]), -(-source.Columns // 2 ** rendered["decoded_level"]))
    assert sidecar["model"]["sha256"] in sc.DerivationDescription
    assert "not for diagnosis" in sc.ImageComments
    assert "lungseg" in [item.Manufacturer for item in sc.ContributingEquipmentSequence]
    assert sidecar["outputs"]["secondary_capture"]["sop_instance_uid"] == sc.SOPInstanceUID
    assert set(sidecar["timings_ms"]) >= {"decode", "preprocess", "infer", "postprocess", "write"}


@pytest.mark.parametrize("name", SHARED_FILES)
def test_real_file_seg_equals_segment_batch_mask(real_run: dict, name: str, tiny_onnx: Path) -> None:
    from lungseg.dicom_decode import read_dicom
    from lungseg.inference import segment_batch
    from lungseg.postprocess import PostprocessConfig
    from lungseg.predictors import OnnxRuntimePredictor

    sidecar = real_run["by_file"][name]
    seg_path = real_run["out"] / sidecar["source"]["study_instance_uid"] / sidecar["outputs"]["segmentation"]["file"]
    assert dciodvfy_errors(seg_path) == []
    seg = hd.seg.segread(seg_path)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        sidecar["source"]["sop_instance_uid"]
    stored = np.asarray(seg.pixel_array).reshape(sidecar["source"]["rows"], sidecar["source"]["columns"])
    radiograph = read_dicom(real_run["source"] / name, min_side=EdgeConfig().decode_min_side,
                            display=True)  # as the edge decodes
    predictor = OnnxRuntimePredictor(str(tiny_onnx))
    expected = segment_batch(predictor, [radiograph], PostprocessConfig(threshold=0.5))[0].mask
    assert stored.shape == expected.shape
    assert np.array_equal(stored.astype(bool), expected.astype(bool))


def test_pydicom_data_samples_give_one_sc_per_instance(tmp_path: Path, tiny_onnx: Path) -> None:
    from lungseg.edge_runtime.cli import main
    from lungseg.edge_runtime.ledger import Ledger
    from lungseg.edge_runtime.samples import main as samples_main
    from lungseg.edge_runtime.samples import sample_files

    if not sample_files():
        pytest.skip("pydicom-data (RG1 sample files) is not installed")
    watch, out = tmp_path / "watch", tmp_path / "out"
    assert samples_main([str(watch)]) == 0  # what `make demo` runs
    copied = sorted(watch.iterdir())
    assert copied and not list(watch.glob("*.part"))
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in copied}
    assert run_once(watch, out, tiny_onnx) == 0
    scs = sc_files(out)
    assert len(scs) == len(uids)
    for path in scs:
        assert dciodvfy_errors(path) == []
        sc = pydicom.dcmread(path, stop_before_pixels=True)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in uids
    ledger = Ledger(out / ".lungseg-state")
    counts = ledger.counts()
    ledger.close()
    assert counts["instances"] == len(uids)
    assert counts["duplicate"] == len(copied) - len(uids)
    preview = tmp_path / "overlay.png"
    assert main(["render", "--first", str(out), "--out", str(preview), "--max-size", "512"]) == 0
    assert preview.stat().st_size > 0
