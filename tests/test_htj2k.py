"""HTJ2K (High-Throughput JPEG 2000) input: decoded exactly at full size, reduced for inference, processed.

``tests/fixtures/cr_chest_htj2k_lossless.dcm`` was encoded by OpenJPH (``make_htj2k.py`` beside it)
from integer-exact pixels this test rebuilds, so a lossless decode must return them bit for bit.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from edge_helpers import run_once, sc_files, sidecars
from pydicom.uid import ExplicitVRLittleEndian

from lungseg.dicom_decode import read_dicom

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HTJ2K_FILE = FIXTURES / "cr_chest_htj2k_lossless.dcm"
sys.path.insert(0, str(FIXTURES))
from make_htj2k import HTJ2K_LOSSLESS, source_pixels  # noqa: E402


@pytest.fixture(scope="module")
def uncompressed_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same header with the stored values written uncompressed: what every decode must agree with."""
    ds = pydicom.dcmread(HTJ2K_FILE)
    ds.PixelData = source_pixels().tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path_factory.mktemp("htj2k") / "uncompressed.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_fixture_is_htj2k_lossless_and_pydicom_decodes_it_exactly() -> None:
    ds = pydicom.dcmread(HTJ2K_FILE)
    assert ds.file_meta.TransferSyntaxUID == HTJ2K_LOSSLESS
    assert ds.PixelData[:4] != b"\x00" * 4 and ds["PixelData"].is_undefined_length  # encapsulated
    np.testing.assert_array_equal(ds.pixel_array, source_pixels())


def test_full_resolution_decode_equals_the_uncompressed_rendering(uncompressed_copy: Path) -> None:
    """The overlay's image (display) and the full-size pixels: bit for bit those of the uncompressed copy."""
    htj2k = read_dicom(HTJ2K_FILE, display=True)
    plain = read_dicom(uncompressed_copy, display=True)
    assert htj2k.source_shape == (408, 512)
    assert htj2k.display is not None and plain.display is not None
    assert htj2k.display.shape == (408, 512)
    np.testing.assert_array_equal(htj2k.display, plain.display)
    np.testing.assert_array_equal(htj2k.pixels, plain.pixels)


def test_reduced_resolution_decode_for_inference(uncompressed_copy: Path) -> None:
    """At a reduced level the code stream's low-pass image stands in for block means of the full image."""
    htj2k = read_dicom(HTJ2K_FILE, min_side=128)
    plain = read_dicom(uncompressed_copy, min_side=128)
    assert htj2k.shape == plain.shape == (204, 256)
    assert htj2k.native_shape == plain.native_shape == (408, 512)
    difference = np.abs(htj2k.pixels - plain.pixels)
    # measured: mean 0.0074, 99th percentile 0.031, r 0.9995 (the 5/3 wavelet's low-pass vs 2x2 block means
    # of a file whose low bits carry a ramp); the inverted image is off by 0.48 on average
    assert float(difference.mean()) < 0.02 and float(np.percentile(difference, 99)) < 0.06
    assert np.corrcoef(htj2k.pixels.ravel(), plain.pixels.ravel())[0, 1] > 0.999


def test_the_edge_processes_htj2k_at_full_resolution(tmp_path: Path, tiny_onnx: Path) -> None:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    shutil.copyfile(HTJ2K_FILE, watch / "htj2k.dcm")
    assert run_once(watch, out, tiny_onnx, seg=True) == 0
    [sc_path] = sc_files(out)
    sc = pydicom.dcmread(sc_path)
    [sidecar] = sidecars(out)
    assert sidecar["rendered"]["sc_columns"] == sc.Columns == 512
    assert sc.Rows >= 408  # the source's rows (plus a text strip below only where the lungs leave no room)
    seg = pydicom.dcmread(sc_path.parent / sidecar["outputs"]["segmentation"]["file"])
    assert (seg.Rows, seg.Columns) == (408, 512)  # the mask on the source's grid
    assert (sc_path.parent / sidecar["outputs"]["structured_report"]["file"]).is_file()
