"""``sc = false``: SEG + SR only, the source decoded at the model's reduced resolution alone (the fast path)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from edge_helpers import make_cr, run_once, save, sc_files, sidecars

from lungseg.edge_runtime.admission import Admission
from lungseg.edge_runtime.config import ConfigError, EdgeConfig
from lungseg.edge_runtime.sidecar import json_schema

HTJ2K_FILE = Path(__file__).resolve().parent / "fixtures" / "cr_chest_htj2k_lossless.dcm"


def _run(tmp_path: Path, model: Path, **settings) -> tuple[Path, dict]:
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    shutil.copyfile(HTJ2K_FILE, watch / "a.dcm")
    assert run_once(watch, out, model, decode_min_side=128, **settings) == 0
    [sidecar] = sidecars(out)
    return out, sidecar


def test_sc_off_writes_seg_and_sr_and_a_valid_sidecar(tmp_path: Path, tiny_onnx: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    out, sidecar = _run(tmp_path, tiny_onnx, sc=False)
    assert sc_files(out) == []
    assert set(sidecar["outputs"]) == {"segmentation", "structured_report"}
    folder = next(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    seg = pydicom.dcmread(folder / sidecar["outputs"]["segmentation"]["file"])
    assert (seg.Rows, seg.Columns) == (408, 512)
    assert (folder / sidecar["outputs"]["structured_report"]["file"]).is_file()
    assert sidecar["rendered"] == {"rows": 204, "columns": 256, "decoded_level": 1,  # no SC fields
                                   "pixel_decoder": "pydicom"}
    assert not list(jsonschema.Draft202012Validator(json_schema()).iter_errors(sidecar))
    assert "sc_encode" not in sidecar["write_stages_ms"] or sidecar["write_stages_ms"]["sc_encode"] < 1.0


def test_by_default_all_three_outputs(tmp_path: Path, tiny_onnx: Path) -> None:
    """The defaults: the overlay SC, the SEG and the SR (IHE AI Results: SEG + SR beside what a viewer shows)."""
    out, sidecar = _run(tmp_path, tiny_onnx)
    assert set(sidecar["outputs"]) == {"secondary_capture", "segmentation", "structured_report"}
    assert sidecar["rendered"]["sc_columns"] == 512 and len(sc_files(out)) == 1


def test_without_an_sc_the_decoder_is_not_asked_for_the_full_resolution_image(tmp_path: Path) -> None:
    """The admission stage asks the decoder for the display image only when an SC will show it."""
    asked: list[bool] = []

    class Recorder:
        def decode(self, data: bytes, ref: str, min_side: int = 0, display: bool = False) -> object:
            asked.append(display)
            return object()

    source = save(make_cr("1.2.826.0.1.3680043.10.1082.77", size=64), tmp_path / "a.dcm")
    for sc in (True, False):
        config = EdgeConfig(watch=tmp_path, out=tmp_path / "out", sc=sc).validate()
        admission = Admission.__new__(Admission)  # only the decode step is exercised
        admission.config, admission.decoder, admission.gpu_decoder = config, Recorder(), None
        admission._decode(source.read_bytes(), "a.dcm")
    assert asked == [True, False]


def test_neither_sc_nor_seg_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to write"):
        EdgeConfig(watch=tmp_path, out=tmp_path / "out", sc=False, seg=False).validate()
