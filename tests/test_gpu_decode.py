"""gpu_decode: JPEG 2000 / HTJ2K frames through nvImageCodec, its limits, and the fall back to the CPU decoder.

nvImageCodec needs an NVIDIA GPU; here a strict fake (tests/fakes_nvimgcodec.py) stands in for it, decoding with
OpenJPEG. What these tests show is lungseg's side: the parameters it asks for, the limits checked before any byte
reaches the decoder, the checks on what comes back, and that every refusal or error ends on the CPU decoder with
the same outputs. Whether the real decoder is pixel-exact is for a GPU machine
(``python -m lungseg.benchmarks.gpu_decode_check``); until then ``gpu_decode`` is off by default.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from edge_helpers import run_once, sidecars
from fakes_nvimgcodec import FakeState
from fakes_nvimgcodec import install as install_nvimgcodec

from lungseg.dicom_decode import read_dicom
from lungseg.gpu_decode import GpuDecodeError, GpuFrameDecoder, codestream_dimensions, looks_like_j2k

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HTJ2K_FILE = FIXTURES / "cr_chest_htj2k_lossless.dcm"


def decoder(monkeypatch: pytest.MonkeyPatch, **limits: int) -> tuple[GpuFrameDecoder, FakeState]:
    state = install_nvimgcodec(monkeypatch)
    made, reason = GpuFrameDecoder.create(max_pixels=limits.get("max_pixels", 50_000_000),
                                          max_frame_bytes=limits.get("max_frame_bytes", 1 << 29))
    assert made is not None, reason
    return made, state


def test_gpu_decode_is_off_by_default() -> None:
    from lungseg.edge_runtime.config import EdgeConfig

    assert EdgeConfig(watch=Path("w"), out=Path("o")).gpu_decode is False


def test_the_gpu_frame_equals_the_cpu_decode_pixel_for_pixel(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu, state = decoder(monkeypatch)
    data = HTJ2K_FILE.read_bytes()
    assert looks_like_j2k(data)
    cpu = read_dicom(HTJ2K_FILE, display=True, min_side=256)
    on_gpu = read_dicom(HTJ2K_FILE, data=data, display=True, min_side=256, frame_decoder=gpu)
    assert state.decodes == 1 and on_gpu.facts["pixel_decoder"] == "nvimgcodec 0.6.1"
    assert cpu.facts["pixel_decoder"] == "pydicom"
    stored = gpu.stored_values(pydicom.dcmread(HTJ2K_FILE))
    assert np.array_equal(stored, pydicom.dcmread(HTJ2K_FILE).pixel_array) and stored.dtype == np.uint16
    assert np.array_equal(on_gpu.pixels, cpu.pixels) and np.array_equal(on_gpu.display, cpu.display)
    assert on_gpu.native_shape == cpu.native_shape


def test_the_parameters_lungseg_asks_for_matter_to_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake is as strict as the real API: with its defaults (8-bit, 3 channels) the frame would differ."""
    gpu, _ = decoder(monkeypatch)
    import nvidia.nvimgcodec as nv

    frame = gpu.check(pydicom.dcmread(HTJ2K_FILE))
    default = np.asarray(nv.Decoder().decode(frame).cpu())
    assert default.dtype == np.uint8 and default.shape[2] == 3
    with pytest.raises((AttributeError, TypeError, ValueError)):
        np.asarray(nv.Decoder().decode(frame), dtype=np.uint16)  # a device image: .cpu() first


def test_limits_are_checked_before_any_byte_reaches_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu, state = decoder(monkeypatch, max_pixels=100_000)
    ds = pydicom.dcmread(HTJ2K_FILE)
    with pytest.raises(GpuDecodeError, match="exceeds the limit"):
        gpu.stored_values(ds)
    small, state = decoder(monkeypatch, max_frame_bytes=1000)
    with pytest.raises(GpuDecodeError, match="code stream of"):
        small.stored_values(ds)
    lying = pydicom.dcmread(HTJ2K_FILE)
    lying.Rows = int(lying.Rows) // 2  # the header and the code stream disagree: a hostile or broken file
    gpu, state = decoder(monkeypatch)
    with pytest.raises(GpuDecodeError, match="code stream states"):
        gpu.stored_values(lying)
    assert state.decodes == 0
    rows, columns, components = codestream_dimensions(gpu.check(ds))
    assert (rows, columns, components) == (int(ds.Rows), int(ds.Columns), 1)


def test_other_transfer_syntaxes_are_not_taken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gpu, state = decoder(monkeypatch)
    ds = pydicom.dcmread(HTJ2K_FILE)
    ds.decompress()
    with pytest.raises(GpuDecodeError, match="is not JPEG 2000"):
        gpu.stored_values(ds)
    ds.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    assert not looks_like_j2k((tmp_path / "plain.dcm").read_bytes()) and state.decodes == 0


def test_an_undecodable_frame_or_a_cuda_error_is_a_gpu_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu, state = decoder(monkeypatch)
    ds = pydicom.dcmread(HTJ2K_FILE)
    frame = gpu.check(ds)
    monkeypatch.setattr("lungseg.gpu_decode.first_frame", lambda _ds: frame[:60])  # a truncated stream
    with pytest.raises(GpuDecodeError, match="could not decode"):
        gpu.stored_values(ds)
    def broken(_ds: object) -> bytes:
        raise ValueError("no item tag in the encapsulated pixel data")

    monkeypatch.setattr("lungseg.gpu_decode.first_frame", broken)  # malformed encapsulation: also falls back
    with pytest.raises(GpuDecodeError, match="no frame could be read"):
        gpu.stored_values(ds)
    monkeypatch.undo()
    gpu, state = decoder(monkeypatch)
    state.fail = True
    with pytest.raises(GpuDecodeError, match="CUDA error 700"):
        gpu.stored_values(ds)


@pytest.mark.parametrize("situation", ["absent", "fails", "works"])
def test_the_edge_with_gpu_decode_falls_back_to_the_cpu_with_the_same_outputs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_onnx: Path, caplog: pytest.LogCaptureFixture,
        situation: str) -> None:
    results = {}
    for run, gpu_decode in (("cpu", False), ("gpu", True)):
        if run == "gpu" and situation != "absent":
            install_nvimgcodec(monkeypatch, FakeState(fail=situation == "fails"))
        watch, out = tmp_path / run / "watch", tmp_path / run / "out"
        watch.mkdir(parents=True)
        shutil.copyfile(HTJ2K_FILE, watch / "htj2k.dcm")
        with caplog.at_level(logging.INFO):
            assert run_once(watch, out, tiny_onnx, seg=True, gpu_decode=gpu_decode) == 0
        [sidecar] = sidecars(out)
        [seg] = out.glob("*/*.seg.dcm")
        results[run] = (sidecar, pydicom.dcmread(seg))
        assert (watch / "htj2k.dcm").read_bytes() == HTJ2K_FILE.read_bytes()
    events = {getattr(r, "event", None) for r in caplog.records}
    expected = {"absent": "gpu_decode_unavailable", "fails": "gpu_decode_fallback", "works": "gpu_decode_ready"}
    assert expected[situation] in events
    decoder_used = results["gpu"][0]["rendered"]["pixel_decoder"]
    assert decoder_used == ("nvimgcodec 0.6.1" if situation == "works" else "pydicom")
    assert results["cpu"][0]["rendered"]["pixel_decoder"] == "pydicom"
    assert np.array_equal(results["cpu"][1].pixel_array, results["gpu"][1].pixel_array)  # the same mask
    assert results["cpu"][0]["lung_area_px"] == results["gpu"][0]["lung_area_px"] > 0


def test_the_gpu_decode_check_reports_exactness_and_says_when_it_cannot_run(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path) -> None:
    import json
    import sys

    from lungseg.benchmarks import gpu_decode_check

    monkeypatch.setitem(sys.modules, "nvidia", None)  # no nvImageCodec: exit 3, said in the JSON
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)
    assert gpu_decode_check.main([str(HTJ2K_FILE), "--out", str(tmp_path / "none")]) == 3
    assert json.loads((tmp_path / "none" / "gpu_decode_check.json").read_text())["no_decoder"] is True
    install_nvimgcodec(monkeypatch)
    plain = tmp_path / "plain.dcm"
    ds = pydicom.dcmread(HTJ2K_FILE)
    ds.decompress()
    ds.save_as(plain, enforce_file_format=True)
    assert gpu_decode_check.main([str(HTJ2K_FILE), str(plain), "--out", str(tmp_path / "ok"), "--repeat", "1"]) == 0
    report = json.loads((tmp_path / "ok" / "gpu_decode_check.json").read_text())
    [htj2k, skipped] = report["files"]
    assert htj2k["pixel_exact"] and htj2k["lossless"] and htj2k["max_abs_diff"] == 0 and report["passed"]
    assert skipped["skipped"] == "not JPEG 2000"
    install_nvimgcodec(monkeypatch, FakeState(fail=True))
    assert gpu_decode_check.main([str(HTJ2K_FILE), "--out", str(tmp_path / "bad"), "--repeat", "1"]) == 1
