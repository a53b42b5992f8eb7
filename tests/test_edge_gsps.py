"""The optional Grayscale Softcopy Presentation State: lung contours over the original image, valid DICOM,
displayed by a real presentation-state renderer (dcmtk's ``dcmp2pgm``) as the overlay shows the image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from edge_helpers import dciodvfy_errors, make_cr, run_once, save, sidecars

from lungseg.dicom_decode import read_dicom
from lungseg.gsps import MAX_POINTS, lung_contours


def _mask() -> np.ndarray:
    mask = np.zeros((300, 400), bool)
    cv2.ellipse(mask.view(np.uint8), (110, 150), (60, 110), 0, 0, 360, 1, -1)
    cv2.ellipse(mask.view(np.uint8), (290, 150), (55, 105), 0, 0, 360, 1, -1)
    mask[10:12, 10:12] = True  # a speck: not a lung
    return mask


def test_contours_are_the_two_lungs_closed_on_pixel_centres() -> None:
    mask = _mask()
    contours = lung_contours(mask)
    assert len(contours) == 2
    for points in contours:
        assert np.array_equal(points[0], points[-1]) and 3 < len(points) <= MAX_POINTS + 1
        columns, rows = (points[:, 0] - 0.5).astype(int), (points[:, 1] - 0.5).astype(int)
        assert mask[rows, columns].all()  # every vertex is a lung pixel on its border
    lefts = sorted(float(p[:, 0].min()) for p in contours)
    assert abs(lefts[0] - 50.5) <= 1 and abs(lefts[1] - 235.5) <= 1


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_edge_writes_a_valid_gsps_that_renders_like_the_overlay(tmp_path: Path, tiny_onnx: Path,
                                                                photometric: str) -> None:
    if shutil.which("dcmp2pgm") is None:
        pytest.skip("dcmtk's dcmp2pgm not installed (Debian package dcmtk)")
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    ds = make_cr("1.2.826.0.1.3680043.8.498.92.1", size=256, pixel_spacing=(1.4, 1.4), photometric=photometric)
    source = save(ds, watch / "chest.dcm")
    assert run_once(watch, out, tiny_onnx, gsps=True) == 0
    [sidecar] = sidecars(out)
    gsps_path = out / str(ds.StudyInstanceUID) / sidecar["outputs"]["presentation_state"]["file"]
    assert gsps_path.name.endswith(".pr.dcm") and dciodvfy_errors(gsps_path) == []
    gsps = pydicom.dcmread(gsps_path)
    assert gsps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
    assert gsps.StudyInstanceUID == ds.StudyInstanceUID
    referenced = gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert referenced == ds.SOPInstanceUID
    layers = {a.GraphicLayer: a for a in gsps.GraphicAnnotationSequence}
    assert set(layers) == {"LUNG_CONTOURS", "LUNG_TEXT"}
    assert all(g.GraphicType == "POLYLINE" for g in layers["LUNG_CONTOURS"].GraphicObjectSequence)
    texts = [t.UnformattedTextValue for t in layers["LUNG_TEXT"].TextObjectSequence]
    assert any(t.startswith("total:") for t in texts)
    assert gsps.PresentationLUTShape == ("INVERSE" if photometric == "MONOCHROME1" else "IDENTITY")
    # a real presentation-state renderer shows the original as the overlay does (lungs dark in both)
    rendered = tmp_path / "gsps.pgm"
    subprocess.run(["dcmp2pgm", "-p", str(gsps_path), str(source), str(rendered)], check=True, capture_output=True)
    shown = cv2.imread(str(rendered), cv2.IMREAD_GRAYSCALE).astype(float)
    display = read_dicom(source, display=True).display.astype(float)
    assert shown.shape == display.shape
    # measured r = 1.000 for both photometrics; the other LUT shape (lungs white) gives r = -1.000
    assert np.corrcoef(shown.ravel(), display.ravel())[0, 1] > 0.99


def test_gsps_is_off_by_default(tmp_path: Path, tiny_onnx: Path) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    save(make_cr("1.2.826.0.1.3680043.8.498.92.2", size=128), watch / "a.dcm")
    assert run_once(watch, out, tiny_onnx) == 0
    [sidecar] = sidecars(out)
    assert "presentation_state" not in sidecar["outputs"] and not list(out.glob("*/*.pr.dcm"))
