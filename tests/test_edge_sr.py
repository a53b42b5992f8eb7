"""The edge writes a TID 1500 SR beside every SEG: valid, the sidecar's areas, cm² only when they can be trusted."""

from __future__ import annotations

import pydicom
import pytest
from edge_helpers import dciodvfy_errors, make_cr, run_once, save, sidecars

from lungseg.bundle import default_bundle_dir, resolve_bundle
from lungseg.sr_report import read_areas


@pytest.mark.parametrize(("spacing", "age", "in_cm2"), [
    ((1.4, 1.4), "045Y", True),  # 256 px x 1.4 mm: an adult chest, plausible -> cm²
    ((0.15, 0.15), "045Y", False),  # 256 px x 0.15 mm = 3.8 cm for an adult: a downsampled film -> pixels
])
def test_edge_writes_a_valid_sr_with_the_sidecars_areas(tmp_path, spacing, age, in_cm2) -> None:
    bundle = resolve_bundle(default_bundle_dir())
    watch, out, state = tmp_path / "in", tmp_path / "out", tmp_path / "state"
    watch.mkdir()
    ds = make_cr("1.2.826.0.1.3680043.8.498.91.1", size=256, pixel_spacing=spacing)
    ds.PatientAge = age
    save(ds, watch / "cr.dcm")
    assert run_once(watch, out, bundle.root, state=state, seg=True) == 0
    [sidecar] = sidecars(out)
    files = sidecar["outputs"]
    sr_path = out / sidecar["source"]["study_instance_uid"] / files["structured_report"]["file"]
    assert dciodvfy_errors(sr_path) == []
    sr = pydicom.dcmread(sr_path)
    assert sr.StudyInstanceUID == ds.StudyInstanceUID and sr.SeriesInstanceUID != ds.SeriesInstanceUID
    areas = read_areas(sr)
    total = areas["total"]
    if in_cm2:
        assert sidecar["qa"]["spacing"]["areas_reliable"] is True
        assert total.unit == "cm2" and abs(total.value - sidecar["lung_areas_cm2"]["total"]) <= 0.01
    else:
        assert "pixel_spacing_implausible" in sidecar["qa"]["flags"]
        assert sidecar["qa"]["spacing"]["areas_reliable"] is False
        assert total.unit != "cm2" and total.value == sidecar["lung_area_px"]
    text = str(sr)  # references: the SEG and the source; the model named as device and algorithm
    assert files["segmentation"]["sop_instance_uid"] in text and ds.SOPInstanceUID in text
    assert bundle.device_uid in text and bundle.version in text and bundle.sha256 in text


def test_sr_of_every_shared_dicom_is_valid(tmp_path) -> None:
    from edge_helpers import shared_dicom_dir

    source = shared_dicom_dir()
    watch, out = tmp_path / "in", tmp_path / "out"
    watch.mkdir()
    for f in source.glob("*.dcm"):
        (watch / f.name).write_bytes(f.read_bytes())
    assert run_once(watch, out, default_bundle_dir(), state=tmp_path / "state", seg=True) == 0
    reports = sorted(out.glob("*/*.sr.dcm"))
    assert len(reports) == 6
    for path in reports:
        assert dciodvfy_errors(path) == [], path.name
