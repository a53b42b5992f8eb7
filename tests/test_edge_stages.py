"""Each stage of the edge pipeline on its own, on real inputs: the six real chest DICOMs (where present),
chest radiographs from the committed fixtures, the shipped model bundle in a real ONNX Runtime session.

decode -> gate, segment -> reference -> measure / QA -> render -> encode -> write -> publish, then the
sidecar against its shipped JSON Schema and the vocabulary enums.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from edge_helpers import SHARED_FILES, dicom_bytes, make_cr, run_once, save, sc_files, shared_dicom_dir, sidecars

from lungseg.bundle import resolve_bundle
from lungseg.dicom_out import OutputVerificationError, Provenance
from lungseg.edge_runtime import service_metrics, stages
from lungseg.edge_runtime.admission import Admission, Admitted
from lungseg.edge_runtime.codes import QAFlag, QuarantineReason, RetryReason, Status
from lungseg.edge_runtime.config import EdgeConfig
from lungseg.edge_runtime.fsio import StagedFiles
from lungseg.edge_runtime.isolate import DecodeFailure, decode_in_process
from lungseg.edge_runtime.ledger import Ledger
from lungseg.edge_runtime.quarantine import Quarantine
from lungseg.edge_runtime.sidecar import SCHEMA_FILE, SCHEMA_ID, Sidecar, json_schema
from lungseg.gate import _WORDS, CORRECTION_PREFIXES, GatePolicy, Refused, load_gate
from lungseg.inference import Segmentation, lung_areas
from lungseg.measurement import qa_report
from lungseg.plausibility import load_shape_model
from lungseg.postprocess import PostprocessConfig
from lungseg.predictors import OnnxRuntimePredictor

UID = "1.2.826.0.1.3680043.10.1082.77."
ROTATED = "dx_chest_mono2_rotated_j2k_lossless.dcm"  # upside down and a negative: the gate corrects both
WITH_SPACING = "dx_chest_mono1_j2k_lossless.dcm"  # usable spacing: areas in cm² per lung


# --- fixtures: the shipped bundle in a real session, and decoded real files ---------------------------------
@pytest.fixture(scope="module")
def bundle():
    return resolve_bundle(None)


@pytest.fixture(scope="module")
def segment_stage(bundle) -> stages.SegmentStage:
    predictor = OnnxRuntimePredictor(str(bundle.onnx), threads=1)
    return stages.SegmentStage(predictor, load_gate(bundle.root), PostprocessConfig(threshold=0.5), GatePolicy(),
                               load_shape_model(bundle.root))


@pytest.fixture(scope="module")
def provenance(bundle) -> Provenance:
    return Provenance(model_name=bundle.name, model_version=bundle.version, model_sha256="0" * 64,
                      model_file=bundle.onnx.name, backend="cpu", precision="fp32", software_version="test",
                      threshold=0.5, bundle_sha256=bundle.sha256, device_uid=bundle.device_uid)


def _admission(root: Path, **settings) -> tuple[Admission, Ledger]:
    watch = root / "watch"
    watch.mkdir(parents=True, exist_ok=True)
    config = EdgeConfig(watch=watch, out=root / "out", quarantine_grace_seconds=0.0, **settings).validate()
    config.state_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(config.state_dir)
    return Admission(config, ledger, Quarantine(config.quarantine_dir, config.quarantine_mode, ledger), watch), ledger


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Admitted]:
    """The six real files through the decode stage (in process: the worker is tested in test_edge_hardening)."""
    source = shared_dicom_dir()
    admission, ledger = _admission(tmp_path_factory.mktemp("real"), isolate_decode=False)
    out: dict[str, Admitted] = {}
    try:
        for name in SHARED_FILES:
            path = admission.watch / name
            path.write_bytes((source / name).read_bytes())
            item, outcome = admission.admit(path, set(), set())
            assert outcome is None and item is not None, outcome
            out[name] = item
    finally:
        admission.close()
        ledger.close()
    return out


@pytest.fixture(scope="module")
def segmented(real: dict[str, Admitted], segment_stage: stages.SegmentStage) -> dict[str, Segmentation]:
    results = segment_stage([real[name].radiograph for name in SHARED_FILES])
    assert all(isinstance(r, Segmentation) for r in results), results
    return dict(zip(SHARED_FILES, results, strict=True))


# --- decode ------------------------------------------------------------------------------------------------
def test_decode_admits_a_real_file_with_its_hash_and_timing(real: dict[str, Admitted]) -> None:
    source = shared_dicom_dir()
    for name, item in real.items():
        data = (source / name).read_bytes()
        assert item.sha256 == hashlib.sha256(data).hexdigest() and item.size == len(data)
        assert item.decode_ms > 0 and item.radiograph.pixels.dtype == np.float32
        assert min(item.radiograph.pixels.shape) >= 256  # decoded at the model's size at least
        assert item.radiograph.dataset.SOPInstanceUID


def test_decode_quarantines_what_is_not_dicom_and_retries_nothing(tmp_path: Path) -> None:
    admission, ledger = _admission(tmp_path, isolate_decode=False)
    try:
        junk = admission.watch / "junk.dcm"
        junk.write_bytes(b"not a dicom file" * 10)
        item, outcome = admission.admit(junk, set(), set())
        assert item is None and outcome is not None
        assert outcome.status == Status.QUARANTINED and outcome.status == "quarantined"
        assert outcome.code == "unreadable"  # the decoder's own code, passed through
        again, seen = admission.admit(junk, set(), set())
        assert again is None and seen.status is Status.SEEN
    finally:
        admission.close()
        ledger.close()


def test_a_file_the_receiver_wrote_is_moved_into_quarantine_a_device_file_only_copied(tmp_path: Path) -> None:
    """Copy mode never alters the device's files; the receiver's own files are moved (no doubled disk use)."""
    import hashlib
    import json

    from lungseg.edge_runtime.audit import Hasher
    from lungseg.edge_runtime.retention import ReceivedFiles

    admission, ledger = _admission(tmp_path, isolate_decode=False)
    try:
        received = ReceivedFiles(admission.config.state_dir, Hasher(admission.config.state_dir))
        admission.own = received
        stored, device = admission.watch / "1.2.3.dcm", admission.watch / "device.dcm"
        for path, content in ((stored, b"received junk" * 10), (device, b"device junk" * 10)):
            path.write_bytes(content)
        received.add(stored, stored.stat().st_size, hashlib.sha256(stored.read_bytes()).hexdigest())
        for path in (stored, device):
            item, outcome = admission.admit(path, set(), set())
            assert item is None and outcome is not None and outcome.status is Status.QUARANTINED
        assert not stored.exists() and device.exists()  # moved; copied
        reasons = {r["file_ref"]: r for r in
                   (json.loads(f.read_text()) for f in admission.config.quarantine_dir.glob("*.reason.json"))}
        assert sorted(r["mode"] for r in reasons.values()) == ["copy", "move"]
        kept = [f for f in admission.config.quarantine_dir.iterdir() if not f.name.endswith(".reason.json")]
        assert sorted(f.read_bytes()[:6] for f in kept) == [b"device", b"receiv"]  # both kept there
        assert received.load() == {}  # nothing left for retention to delete
    finally:
        admission.close()
        ledger.close()


def test_decode_sees_a_twin_and_a_uid_twin_in_one_batch(tmp_path: Path) -> None:
    admission, ledger = _admission(tmp_path, isolate_decode=False)
    try:
        data = dicom_bytes(make_cr(UID + "1", size=300))
        first, twin = admission.watch / "a.dcm", admission.watch / "b.dcm"
        first.write_bytes(data)
        twin.write_bytes(data)
        uids: set[str] = set()
        shas: set[str] = set()
        item, _ = admission.admit(first, uids, shas)
        assert item is not None and item.radiograph.source_shape == (300, 300)
        none, outcome = admission.admit(twin, uids, shas, first=False)
        assert none is None and outcome.status is Status.RETRY and outcome.code is RetryReason.SAME_CONTENT_IN_BATCH
        save(make_cr(UID + "1", index=1, size=300), admission.watch / "c.dcm")  # other pixels, same SOPInstanceUID
        none, outcome = admission.admit(admission.watch / "c.dcm", uids, shas, first=False)
        assert none is None and outcome.code is RetryReason.SAME_UID_IN_BATCH
    finally:
        admission.close()
        ledger.close()


def test_decode_failures_carry_enum_codes_that_serialise_as_before() -> None:
    failure = decode_in_process(b"\x00" * 200, "junk")
    assert isinstance(failure, DecodeFailure) and failure.code == "unreadable"
    oom = DecodeFailure(QuarantineReason.DECODER_OOM, "x")
    assert json.dumps({"code": oom.code}) == '{"code": "decoder_oom"}' and f"{oom.code}" == "decoder_oom"


def test_the_decode_workers_entry_loads_no_library_before_its_thread_limits() -> None:
    """The spawned worker imports its entry module first: numeric libraries must not load (and size
    their thread pools) before it sets one thread each (with them loaded early, an image the worker
    could decode under its memory limit ran out of address space instead)."""
    import subprocess
    import sys

    code = ("import sys; import lungseg.edge_runtime.worker_entry; "
            "print([m for m in ('numpy', 'cv2', 'pydicom', 'lungseg.dicom_decode') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


# --- gate, segment -----------------------------------------------------------------------------------------
def test_segment_gives_a_segmentation_per_real_file_with_gate_qa(segmented: dict[str, Segmentation],
                                                                   real: dict[str, Admitted]) -> None:
    for name, seg in segmented.items():
        rows, columns = real[name].radiograph.source_shape
        assert seg.mask.shape == (rows, columns) and seg.mask.dtype == bool and seg.mask.any()
        assert {"flags", "review", "gate"} <= set(seg.qa)
        assert {"preprocess", "infer", "postprocess", "gate", "qa"} <= set(seg.timings_ms)
    flags = segmented[ROTATED].qa["flags"]
    assert "orientation_corrected:180" in flags and "negative_corrected" in flags


def test_segment_refuses_a_declared_non_chest_in_refuse_mode(bundle, segment_stage: stages.SegmentStage) -> None:
    from lungseg.dicom_decode import read_dicom

    ds = make_cr(UID + "2", size=300)
    ds.BodyPartExamined = "HAND"
    radiograph = read_dicom("hand", data=dicom_bytes(ds))
    refusing = dataclasses.replace(GatePolicy(), mode="refuse")
    stage = stages.SegmentStage(segment_stage.predictor, segment_stage.gate, segment_stage.postprocess, refusing,
                                segment_stage.shape_model)
    [result] = stage([radiograph])
    assert isinstance(result, Refused) and result.code == "body_part:HAND"
    assert QuarantineReason.refused(result.code) is QuarantineReason.REFUSED_BODY_PART
    assert QuarantineReason.refused("new_kind:X") == "refused_new_kind"  # never lost to a kind added later


def test_segment_retries_a_failed_batch_file_by_file(real: dict[str, Admitted],
                                                     segment_stage: stages.SegmentStage) -> None:
    good = real[SHARED_FILES[0]].radiograph
    broken = dataclasses.replace(good, pixels=np.zeros((0, 0), np.float32))  # no pixels: preprocessing fails
    results = segment_stage([good, broken])
    assert isinstance(results[0], Segmentation) and isinstance(results[1], Exception)
    with pytest.raises(Exception):  # noqa: B017 - a single file's failure is the caller's to classify
        segment_stage([broken])


# --- reference ---------------------------------------------------------------------------------------------
def test_reference_empties_invalid_source_values_and_an_unknown_character_set(real: dict[str, Admitted]) -> None:
    spacing = stages.reference(real["cr_chest_mono1_uncompressed.dcm"].radiograph.dataset, "f-1")
    assert spacing.emptied == ["PixelSpacing"] and "PixelData" not in spacing.dataset
    invalid = stages.reference(real[ROTATED].radiograph.dataset, "f-2")
    assert invalid.emptied == ["SpecificCharacterSet"] and stages.known_character_set(invalid.dataset)
    unknown = make_cr(UID + "3", size=64)
    unknown.SpecificCharacterSet = "ISO_IR 999"  # values were read with the default: the outputs say UTF-8
    charset = stages.reference(unknown, "f-4")
    assert charset.emptied == ["SpecificCharacterSet"] and charset.dataset.SpecificCharacterSet == "ISO_IR 192"
    clean = stages.reference(real["cr_chest_mono1_no_file_meta.dcm"].radiograph.dataset, "f-3")
    assert clean.emptied == [] and stages.known_character_set(clean.dataset)


# --- measure / QA ------------------------------------------------------------------------------------------
def test_measure_reports_areas_per_lung_in_cm2_with_usable_spacing(real: dict[str, Admitted],
                                                                   segmented: dict[str, Segmentation]) -> None:
    radiograph, seg = real[WITH_SPACING].radiograph, segmented[WITH_SPACING]
    measured = stages.measure(radiograph, seg)
    expected = lung_areas(seg.final_mask, radiograph.pixel_spacing_mm, seg.native_pixels_per_pixel)
    assert measured.areas.lung_area_px == expected["lung_area_px"]
    assert list(measured.areas.lung_areas_cm2) == ["total", "right_lung", "left_lung"]  # PatientOrientation: L
    assert measured.areas.lung_areas_cm2["total"] == round(expected["lung_area_mm2"] / 100.0, 2)
    total = f"total: {measured.areas.lung_areas_cm2['total']:.1f} cm2"
    assert measured.lines == [f"right lung: {measured.areas.lung_areas_cm2['right_lung']:.1f} cm2",
                              f"left lung: {measured.areas.lung_areas_cm2['left_lung']:.1f} cm2", total] + (
        ["QA: " + ", ".join(measured.flags)] if measured.flags else [])


def test_measure_without_spacing_says_so_and_words_corrections_apart(real: dict[str, Admitted],
                                                                     segmented: dict[str, Segmentation]) -> None:
    plain = stages.measure(real["cr_chest_mono1_no_file_meta.dcm"].radiograph,
                           segmented["cr_chest_mono1_no_file_meta.dcm"])
    assert plain.areas.lung_areas_cm2 is None and plain.lines == ["areas: no usable pixel spacing"]
    assert plain.review == [] and plain.notes == []
    rotated = stages.measure(real[ROTATED].radiograph, segmented[ROTATED])
    assert rotated.notes == ["image was rotated: turned 180 deg counter-clockwise before segmenting",
                             "image was a negative: inverted before segmenting"]
    assert "image looks mirrored left-right" in rotated.review
    assert not any("rotated" in words for words in rotated.review)  # a correction alone is no reason to review


def test_qa_of_an_ungated_mask_flags_it_for_review() -> None:
    mask = np.zeros((100, 100), bool)
    mask[40:42, 40:42] = True
    qa = qa_report(mask, {})
    assert qa["flags"] == qa["review"] == ["not_two_lungs", "implausible_area"]


# --- render ------------------------------------------------------------------------------------------------
def test_render_draws_the_overlay_at_the_sc_size_with_its_captions(real: dict[str, Admitted],
                                                                   segmented: dict[str, Segmentation],
                                                                   provenance: Provenance) -> None:
    radiograph, seg = real[ROTATED].radiograph, segmented[ROTATED]
    measured = stages.measure(radiograph, seg)
    full = stages.render(radiograph, seg, measured, provenance, max_side=0)
    assert radiograph.display is not None and radiograph.display.shape == radiograph.source_shape
    assert full.rgb.shape == (*radiograph.source_shape, 3) and full.rgb.dtype == np.uint8  # native size
    assert full.strip_rows == 0 and {"legend", "caption", "banner"} <= set(full.text_boxes)
    assert full.review_text.startswith("REVIEW: ") and "mirrored" in full.review_text
    assert full.comments.startswith("research use - not for diagnosis.; REVIEW: ")
    assert full.comments.endswith(measured.lines[-1])
    # sc_max_side caps the SC, but never below MIN_SC_SIDE (the legend and banner must stay whole and off the lungs)
    assert max(radiograph.source_shape) > stages.MIN_SC_SIDE
    capped = stages.render(radiograph, seg, measured, provenance, max_side=200)
    image_rows = capped.shape[0] - capped.strip_rows  # (a strip below the image if the lungs leave no room)
    assert max(image_rows, capped.shape[1]) == stages.MIN_SC_SIDE


# --- encode, write, publish --------------------------------------------------------------------------------
@pytest.fixture
def written(tmp_path: Path, real: dict[str, Admitted], segmented: dict[str, Segmentation],
            provenance: Provenance) -> dict:
    """One real file through reference .. encode, with its output paths under ``tmp_path``."""
    item, seg = real[ROTATED], segmented[ROTATED]
    ds = item.radiograph.dataset
    ref = stages.reference(ds, item.name)
    measured = stages.measure(item.radiograph, seg)
    rendering = stages.render(item.radiograph, seg, measured, provenance, max_side=0)
    paths = stages.output_paths(tmp_path, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), seg=True)
    return {"item": item, "seg": seg, "ref": ref, "measured": measured, "rendering": rendering, "paths": paths,
            "sc": stages.encode_sc(ref, rendering, provenance, "explicit"),
            "seg_ds": stages.encode_seg(ref, seg, rendering.review_text, provenance)}


def test_encode_builds_an_sc_of_the_overlay_and_a_seg_of_the_mask(written: dict) -> None:
    sc, seg_ds, rendering = written["sc"], written["seg_ds"], written["rendering"]
    source = written["item"].radiograph.dataset
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and (sc.Rows, sc.Columns) == rendering.shape
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.ImageComments == rendering.comments
    assert seg_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert "REVIEW" in seg_ds.SeriesDescription


def test_write_stages_verified_files_that_appear_only_when_published(written: dict) -> None:
    paths, clock = written["paths"], stages.StageClock()
    with StagedFiles() as staged:
        stages.write_sc(staged, paths.sc, written["sc"], written["rendering"].rgb, decode=True, clock=clock)
        stages.write_seg(staged, paths.seg, written["seg_ds"], written["seg"].mask)
        assert not paths.sc.exists() and not paths.seg.exists()
        published = staged.publish()
    assert published == [paths.sc, paths.seg] and all(p.is_file() for p in published)
    assert list(clock.stages_ms()) == ["sc_save", "sc_verify"]


def test_write_refuses_an_sc_that_is_not_the_image_drawn_and_leaves_nothing(written: dict) -> None:
    paths = written["paths"]
    other = written["rendering"].rgb.copy()
    other[0, 0] ^= 255
    with pytest.raises(OutputVerificationError), StagedFiles() as staged:
        stages.write_sc(staged, paths.sc, written["sc"], other, decode=False, clock=stages.StageClock())
    assert not paths.sc.parent.exists() or not any(paths.sc.parent.iterdir())


def test_background_sc_keeps_the_order_and_reports_its_stages(written: dict, provenance: Provenance) -> None:
    """The SC encoded and written on its own thread while the SEG is written: staged first, published first,
    timed, and the same SC as one encoded on the calling thread."""
    paths, clock = written["paths"], stages.StageClock()
    with StagedFiles() as staged:
        job = stages.BackgroundSc(staged, paths.sc, written["ref"], written["rendering"], provenance,
                                  syntax="explicit", decode=True)
        stages.write_seg(staged, paths.seg, written["seg_ds"], written["seg"].mask)  # meanwhile, on this thread
        sc = job.wait(clock)
        published = staged.publish()
    assert published == [paths.sc, paths.seg] and all(p.is_file() for p in published)
    assert {"sc_encode", "sc_save", "sc_verify", "sc_wait"} <= set(clock.stages_ms())
    assert sc.SOPInstanceUID == written["sc"].SOPInstanceUID and sc.ImageComments == written["sc"].ImageComments
    assert np.array_equal(pydicom.dcmread(paths.sc).pixel_array, written["rendering"].rgb)


def test_background_sc_raises_its_error_here_and_leaves_nothing(written: dict, provenance: Provenance) -> None:
    paths = written["paths"]
    with pytest.raises(ValueError, match="SC syntax"), StagedFiles() as staged:
        stages.BackgroundSc(staged, paths.sc, written["ref"], written["rendering"], provenance, syntax="nonsense",
                            decode=False).wait(stages.StageClock())
    assert not paths.sc.parent.exists() or not any(paths.sc.parent.iterdir())


def test_publish_writes_the_sidecar_last_and_it_matches_the_schema(written: dict, provenance: Provenance) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    paths, item, seg = written["paths"], written["item"], written["seg"]
    timings = stages.file_timings(item.decode_ms, seg.timings_ms, 12.5)
    sidecar = stages.sidecar_for(item, written["ref"], written["measured"], written["rendering"], written["sc"],
                                 written["seg_ds"], paths, stages.Serving(provenance, ["gpu: none"]),
                                 timings_ms=timings, write_stages_ms={"reference": 1.0}, batch_size=1)
    with StagedFiles() as staged:
        stages.write_sc(staged, paths.sc, written["sc"], written["rendering"].rgb, decode=False,
                        clock=stages.StageClock())
        stages.write_seg(staged, paths.seg, written["seg_ds"], seg.mask)
        published = stages.publish(staged, paths, sidecar)
    assert published == [paths.sc, paths.seg, paths.sidecar]
    document = json.loads(paths.sidecar.read_text())
    assert paths.sidecar.read_bytes() == sidecar.to_json()
    jsonschema.validate(document, json_schema())
    assert document["schema"] == SCHEMA_ID == "lungseg-edge/sidecar/2"
    assert document["timings_ms"]["total"] == round(sum(v for k, v in timings.items() if k != "total"), 2)
    assert document["qa"]["flags"][:3] == ["orientation_corrected:180", "negative_corrected", "mirrored"]
    assert document["source"]["attributes_emptied_in_outputs"] == ["SpecificCharacterSet"]
    assert document["outputs"]["segmentation"]["file"] == paths.seg.name
    assert "selftest" not in document  # a plain predictor reports no backend health


def test_record_metrics_counts_the_file_and_its_flags() -> None:
    pytest.importorskip("prometheus_client")
    service_metrics.enable()
    try:
        stages.record_metrics({"decode": 5.0, "write": 7.0, "total": 12.0}, ["mirrored"])
        text = service_metrics.render().decode()
    finally:
        service_metrics.disable()
    assert "lungseg_processed_total 1.0" in text and 'lungseg_flagged_total{flag="mirrored"} 1.0' in text
    assert 'lungseg_stage_seconds_count{stage="decode"} 1.0' in text and 'stage="total"' not in text


def test_the_stage_clock_times_consecutive_stages() -> None:
    clock = stages.StageClock()
    clock.mark("a")
    clock.mark("b")
    times = clock.stages_ms()
    assert list(times) == ["a", "b"] and all(t >= 0 for t in times.values())
    assert clock.elapsed_ms() >= sum(times.values()) - 0.02


# --- the sidecar contract ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_sidecars(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Sidecars the daemon wrote for the six real files (shipped model, --seg)."""
    source = shared_dicom_dir()
    root = tmp_path_factory.mktemp("sidecars")
    watch, out = root / "watch", root / "out"
    watch.mkdir()
    for name in SHARED_FILES:
        (watch / name).write_bytes((source / name).read_bytes())
    assert run_once(watch, out, None, seg=True) == 0
    assert len(sc_files(out)) == len(SHARED_FILES)
    return sidecars(out)


def test_the_shipped_schema_is_valid_and_packaged() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema"]["const"] == SCHEMA_ID
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert SCHEMA_FILE.name in pyproject  # shipped as package data


def test_real_sidecars_match_the_schema(real_sidecars: list[dict]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    for document in real_sidecars:
        assert not list(validator.iter_errors(document)), document["source"]["file"]
        assert list(document)[:5] == ["schema", "disclaimer", "processed_at", "source", "outputs"]
        assert {"selftest", "demotions"} <= set(document)  # the daemon's predictor reports its health


def test_the_schema_rejects_a_changed_layout(real_sidecars: list[dict]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    document = real_sidecars[0]
    for broken in ({**document, "schema": "lungseg-edge/sidecar/1"},
                   {k: v for k, v in document.items() if k != "qa"},
                   {**document, "new_field": 1},
                   {**document, "qa": {**document["qa"], "flags": ["unheard_of_flag"]}}):
        assert list(validator.iter_errors(broken))


def test_a_sidecar_round_trips_through_its_typed_object(real_sidecars: list[dict]) -> None:
    from lungseg.edge_runtime.sidecar import (
        Areas,
        BackendHealth,
        ModelInfo,
        OutputFile,
        Outputs,
        Rendered,
        SourceInfo,
    )

    d = real_sidecars[0]
    outputs = d["outputs"]
    sidecar = Sidecar(
        disclaimer=d["disclaimer"], processed_at=d["processed_at"], source=SourceInfo(**d["source"]),
        outputs=Outputs(OutputFile(**outputs["secondary_capture"]),
                        OutputFile(**outputs["segmentation"]) if "segmentation" in outputs else None,
                        OutputFile(**outputs["structured_report"]) if "structured_report" in outputs else None),
        pixel_spacing_mm=d["pixel_spacing_mm"], rendered=Rendered(**d["rendered"]),
        areas=Areas(d["lung_area_px"], d.get("lung_area_px_by_lung"), d.get("lung_areas_cm2")), qa=d["qa"],
        timings_ms=d["timings_ms"], write_stages_ms=d["write_stages_ms"], decode_parts_ms=d["decode_parts_ms"],
        backend=d["backend"], precision=d["precision"], fallbacks=d["fallbacks"],
        backend_health=BackendHealth(d["selftest"], d["demotions"], d.get("backend_choice")),
        batch_size=d["batch_size"],
        model=ModelInfo(**d["model"]), software_version=d["software"]["lungseg"])
    assert json.loads(sidecar.to_json()) == d
    assert list(json.loads(sidecar.to_json())) == list(d)  # same keys, same order


# --- the vocabulary ----------------------------------------------------------------------------------------
def test_statuses_and_codes_serialise_as_their_values() -> None:
    assert Status.DONE == "done" and str(Status.DONE) == "done" and f"{Status.RETRY}" == "retry"
    assert {"done": 1}[Status.DONE] == 1 and Status("quarantined") is Status.QUARANTINED
    assert json.dumps([Status.SEEN, RetryReason.OUT_OF_MEMORY]) == '["seen", "out_of_memory"]'


def test_the_qa_flag_enum_is_the_gates_vocabulary() -> None:
    assert {flag.value for flag in QAFlag} == set(_WORDS)
    corrections = {flag.value for flag in QAFlag if flag.is_correction}
    assert corrections == set(CORRECTION_PREFIXES)
    assert QAFlag.of("orientation_corrected:90") is QAFlag.ORIENTATION_CORRECTED and QAFlag.of("nonsense") is None
    pattern = json_schema()["$defs"]["flag"]["pattern"]
    assert all(code in pattern for code in _WORDS)


def test_the_package_map_names_every_module() -> None:
    import lungseg.edge_runtime as package

    modules = {p.stem for p in Path(package.__file__).parent.glob("*.py")} - {"__init__", "__main__"}
    assert {m for m in modules if f"``{m}``" not in (package.__doc__ or "")} == set()
