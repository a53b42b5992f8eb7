"""``lungseg-segment`` end to end with a real onnxruntime session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungseg.data import load_manifest
from lungseg.segment import EXIT_NO_MODEL, EXIT_OK, EXIT_SOME_FAILED, main


def _json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_masks_at_native_size_and_json(tmp_path, tiny_onnx, fixture_manifest):
    records = load_manifest(fixture_manifest)[:3]
    report = tmp_path / "out.jsonl"
    code = main([*(str(r.image) for r in records), "--model", str(tiny_onnx), "--out", str(tmp_path / "m"),
                 "--json-out", str(report)])
    assert code == EXIT_OK
    lines = _json_lines(report)
    assert len(lines) == 3
    for record, line in zip(records, lines, strict=True):
        mask = cv2.imread(str(tmp_path / "m" / f"{record.image.stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(record.image), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        assert line["lung_area_px"] == int((mask == 255).sum())
        assert "lung_areas_cm2" not in line  # a PNG has no pixel spacing


def test_bad_inputs_are_named_and_the_rest_processed(tmp_path, tiny_onnx, fixture_manifest, capsys):
    good = load_manifest(fixture_manifest)[0].image
    junk = tmp_path / "junk.png"
    junk.write_text("this is not an image")
    missing = tmp_path / "missing.dcm"
    code = main([str(junk), str(missing), str(good), "--model", str(tiny_onnx), "--out", str(tmp_path / "m")])
    assert code == EXIT_SOME_FAILED
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out[0]["input"] == str(junk) and "decodable" in out[0]["error"]
    assert out[1]["input"] == str(missing) and "error" in out[1]
    assert (tmp_path / "m" / f"{good.stem}_mask.png").is_file()


def test_missing_model_exit_code(tmp_path, fixture_manifest):
    image = load_manifest(fixture_manifest)[0].image
    assert main([str(image), "--model", str(tmp_path / "nope.onnx"), "--out", str(tmp_path)]) == EXIT_NO_MODEL


def test_dicom_with_spacing_reports_mm2(tmp_path, tiny_onnx, shared_data, capsys):
    source = shared_data / "dicom" / "dx_chest_mono2_rotated_j2k_lossless.dcm"
    copy = tmp_path / "noextension"
    shutil.copy(source, copy)
    assert main([str(copy), "--model", str(tiny_onnx), "--out", str(tmp_path / "m")]) == EXIT_OK
    line = json.loads(capsys.readouterr().out)
    assert line["rows"] == 1416 or line["columns"] == 1416
    assert line["pixel_spacing_mm"] == pytest.approx([0.4, 0.4])
    assert line["lung_areas_cm2"]["total"] == pytest.approx(line["lung_area_px"] * 0.16 / 100, abs=0.01)
    assert line["schema"] == "lungseg-segment/line/2"  # the edge sidecar's area vocabulary
    mask = cv2.imread(str(tmp_path / "m" / "noextension_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (line["rows"], line["columns"])


def test_json_is_a_switch_and_the_file_is_json_out(tmp_path, tiny_onnx, fixture_manifest, capsys):
    image = str(load_manifest(fixture_manifest)[0].image)
    base = [image, "--model", str(tiny_onnx), "--out", str(tmp_path / "m")]
    assert main([*base, "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["input"] == image
    with pytest.raises(SystemExit) as info:  # the old `--json PATH` would make PATH an input: refused, explained
        main([*base, "--json", str(tmp_path / "out.jsonl")])
    assert info.value.code == 2 and "--json-out PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--json", "--json-out", str(tmp_path / "out.jsonl")])


def test_old_auto_orient_form_still_works_with_a_warning(tmp_path, tiny_onnx, fixture_manifest, caplog):
    image = str(load_manifest(fixture_manifest)[0].image)
    code = main([image, "--model", str(tiny_onnx), "--out", str(tmp_path / "m"), "--auto-orient", "off",
                 "--json-out", str(tmp_path / "out.jsonl")])
    assert code == EXIT_OK
    assert "--auto-orient on|off is deprecated" in caplog.text
    assert (tmp_path / "m" / f"{Path(image).stem}_mask.png").is_file()


@pytest.mark.parametrize(("spacing", "in_cm2"), [((1.4, 1.4), True), ((0.15, 0.15), False)])
def test_dicom_out_writes_a_valid_seg_and_sr_with_the_lines_areas(tmp_path, spacing, in_cm2, capsys) -> None:
    """``--dicom-out``: the SEG and the TID 1500 SR the edge writes, for a DICOM input (not for a PNG)."""
    import pydicom
    from edge_helpers import dciodvfy_errors, make_cr, save

    from lungseg.bundle import default_bundle_dir, resolve_bundle
    from lungseg.sr_report import read_areas

    bundle = resolve_bundle(default_bundle_dir())
    ds = make_cr("1.2.826.0.1.3680043.8.498.91.7", size=256, pixel_spacing=spacing)
    ds.PatientAge = "045Y"
    source = save(ds, tmp_path / "chest.dcm")
    png = sorted((Path(__file__).resolve().parent / "fixtures" / "cxr" / "images").glob("*.png"))[0]
    code = main([str(source), str(png), "--model", str(bundle.root), "--out", str(tmp_path / "m"),
                 "--dicom-out", str(tmp_path / "dicom"), "--gate", "off"])
    assert code == EXIT_OK
    dicom_line, png_line = (json.loads(x) for x in capsys.readouterr().out.splitlines())
    assert png_line["dicom"] is None  # an image file has no DICOM header to build on
    seg_path, sr_path = Path(dicom_line["dicom"]["seg"]), Path(dicom_line["dicom"]["sr"])
    assert (seg_path.name, sr_path.name) == ("chest.seg.dcm", "chest.sr.dcm")
    assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(seg_path) == []
    seg, sr = pydicom.dcmread(seg_path), pydicom.dcmread(sr_path)
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == ds.StudyInstanceUID
    assert seg.SOPInstanceUID in str(sr) and ds.SOPInstanceUID in str(sr)  # the SR references SEG and source
    assert bundle.device_uid in str(sr) and bundle.version in str(sr)
    mask = cv2.imread(str(tmp_path / "m" / "chest_mask.png"), cv2.IMREAD_UNCHANGED)
    assert int((seg.pixel_array > 0).sum()) == int((mask == 255).sum()) == dicom_line["lung_area_px"]
    total = read_areas(sr)["total"]
    if in_cm2:
        assert total.unit == "cm2" and abs(total.value - dicom_line["lung_areas_cm2"]["total"]) <= 0.01
    else:
        assert "pixel_spacing_implausible" in dicom_line["flags"]
        assert total.unit != "cm2" and total.value == dicom_line["lung_area_px"]
