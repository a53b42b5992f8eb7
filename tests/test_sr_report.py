"""The TID 1500 Measurement Report (lungseg.sr_report): valid DICOM, the areas read back, the references, the model."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from edge_helpers import SHARED_FILES, dciodvfy_errors, make_cr, shared_dicom_dir
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from lungseg.bundle import default_bundle_dir
from lungseg.errors import LungsegError
from lungseg.provenance import ModelIdentity, derived_uid, model_identity
from lungseg.sr_report import (
    AlgorithmIdentity,
    LungAreaReport,
    LungAreas,
    LungMeasurements,
    SRReportError,
    build_measurement_report,
    build_report,
    evidence_dataset,
    lung_segments,
    read_areas,
    write_report,
)

AREAS_CM2 = LungAreas(total=312.346, right=170.101, left=142.245)
AREAS_PX = LungAreas(total=15_000, right=8_000, left=7_000)
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
         "StudyTime", "ReferringPhysicianName")


@pytest.fixture(scope="module")
def identity() -> ModelIdentity:
    return model_identity(default_bundle_dir(), backend="cpu", precision="fp32", threshold=0.5)


def _reference(source: Dataset) -> Dataset:
    """The source without pixels and with the fixes the SR applies (what the edge hands its SEG writer)."""
    ref = Dataset()
    for elem in source:
        if elem.tag.group != 0x7FE0:
            ref.add(elem)
    fixed, _ = evidence_dataset(source)
    for keyword in (*TYPE2, "SpecificCharacterSet"):
        if keyword in fixed:
            ref[keyword] = fixed[keyword]
    return ref


def _seg(source: Dataset, identity: ModelIdentity, *, per_lung: bool = False) -> hd.seg.Segmentation:
    """A small BINARY SEG of ``source``: one "Lung" segment (as the edge writes), or one per lung."""
    rows, columns = int(source.Rows), int(source.Columns)
    right = np.zeros((rows, columns), np.uint8)
    right[rows // 4: rows * 3 // 4, columns // 8: columns * 3 // 8] = 1
    left = np.fliplr(right)
    if per_lung:
        masks = np.stack([right, left], axis=-1)[None]
        labels = [("Right lung", codes.SCT.Right), ("Left lung", codes.SCT.Left)]
    else:
        masks = (right | left)[None]
        labels = [("Lung", None)]
    descriptions = []
    for number, (label, side) in enumerate(labels, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Lung, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identity.seg_algorithm())
        if side is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(side)]
        descriptions.append(description)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom/highdicom warnings about the sources' odd values
        ref = _reference(source)
        return hd.seg.Segmentation(
            source_images=[ref], pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=derived_uid(ref.SeriesInstanceUID, "seg-series"),
            series_number=2001, sop_instance_uid=derived_uid(ref.SOPInstanceUID, "seg"), instance_number=1,
            manufacturer="lungseg", manufacturer_model_name="lungseg-tests", software_versions="0",
            device_serial_number="none", omit_empty_frames=False)


def _report(source: Dataset, seg: Dataset, identity: ModelIdentity, **kwargs) -> LungAreaReport:
    values = {"areas_cm2": AREAS_CM2, "areas_px": AREAS_PX, "spacing_source": "PixelSpacing",
              "qa_flags": ["orientation_corrected:90", "lung_size_asymmetry"],
              "gate_flags": ["orientation_corrected:90"], "review": True, **kwargs}
    return LungAreaReport(source=source, seg=seg, identity=identity, **values)


def _write(sr: Dataset, tmp_path: Path, name: str = "report.sr.dcm") -> Path:
    return write_report(sr, tmp_path / name)


def _dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's errors (none checked where dicom3tools is absent: the other checks still run)."""
    return dciodvfy_errors(path) if shutil.which("dciodvfy") else []


def _items(node: Dataset) -> Iterator[Dataset]:
    for item in node.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _texts(sr: Dataset, code_value: str) -> list[str]:
    return [str(i.TextValue) for i in _items(sr) if i.ValueType == "TEXT"
            and i.ConceptNameCodeSequence[0].CodeValue == code_value]


def _uids(sr: Dataset, code_value: str) -> list[str]:
    return [str(i.UID) for i in _items(sr) if i.ValueType == "UIDREF"
            and i.ConceptNameCodeSequence[0].CodeValue == code_value]


def _evaluations(sr: Dataset) -> list[tuple[str, str]]:
    """(concept code, value code) of every CODE item in the measurement groups."""
    out = []
    for item in _items(sr):
        if item.ValueType == "CODE":
            value = item.ConceptCodeSequence[0]
            out.append((str(item.ConceptNameCodeSequence[0].CodeValue),
                        str(value.get("CodeValue") or value.get("LongCodeValue"))))
    return out


def _segment_references(sr: Dataset) -> list[tuple[str, int]]:
    return [(str(ref.ReferencedSOPInstanceUID), int(ref.ReferencedSegmentNumber)) for item in _items(sr)
            for ref in item.get("ReferencedSOPSequence", []) if "ReferencedSegmentNumber" in ref]


def _image_references(sr: Dataset) -> set[str]:
    return {str(ref.ReferencedSOPInstanceUID) for item in _items(sr) for ref in item.get("ReferencedSOPSequence", [])
            if "ReferencedSegmentNumber" not in ref}


def _check_model(sr: Dataset, identity: ModelIdentity) -> None:
    assert _texts(sr, "111001") and set(_texts(sr, "111001")) == {identity.model_name}  # Algorithm Name
    assert set(_texts(sr, "111003")) == {identity.model_version}  # Algorithm Version
    assert f"bundle_sha256={identity.bundle_sha256}" in _texts(sr, "111002")  # Algorithm Parameters
    assert _uids(sr, "121012") == [identity.device_uid]  # Device Observer UID
    ours = [item for item in sr.ContributingEquipmentSequence if "DeviceUID" in item]
    assert len(ours) == 1 and ours[0].DeviceUID == identity.device_uid
    assert identity.label in list(ours[0].SoftwareVersions)


@pytest.mark.parametrize("name", SHARED_FILES)
def test_report_on_a_real_radiograph(name: str, tmp_path: Path, identity: ModelIdentity) -> None:
    source = pydicom.dcmread(shared_dicom_dir() / name, force=True, stop_before_pixels=True)
    seg = _seg(source, identity)
    path = _write(build_report(_report(source, seg, identity)), tmp_path)
    assert _dciodvfy_errors(path) == []
    sr = pydicom.dcmread(path)
    areas = read_areas(path)
    assert set(areas) == {"total", "right", "left"}
    for side, expected in AREAS_CM2.items():
        assert areas[side].value == pytest.approx(expected, abs=0.01) and areas[side].unit == "cm2"
        assert areas[side].segment_number == 1
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, seg.SeriesInstanceUID)
    assert _segment_references(sr) == [(seg.SOPInstanceUID, 1)]
    assert source.SOPInstanceUID in _image_references(sr)
    evidence = {str(i.ReferencedSOPInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert evidence == {source.SOPInstanceUID, seg.SOPInstanceUID}
    _check_model(sr, identity)


def test_report_on_the_committed_fixture_with_one_segment_per_lung(tmp_path: Path, identity: ModelIdentity) -> None:
    source = make_cr("1.2.826.0.1.3680043.8.498.41.1", size=256, pixel_spacing=(1.4, 1.4))
    seg = _seg(source, identity, per_lung=True)
    assert lung_segments(seg) == {"right": 1, "left": 2}
    path = _write(build_report(_report(source, seg, identity)), tmp_path)
    assert _dciodvfy_errors(path) == []
    areas = read_areas(path)
    assert {side: (a.segment_number, a.unit) for side, a in areas.items()} == {
        "right": (1, "cm2"), "left": (2, "cm2"), "total": (None, "cm2")}  # the total: in the image-level group
    for side, expected in AREAS_CM2.items():
        assert areas[side].value == pytest.approx(expected, abs=0.01)
    sr = pydicom.dcmread(path)
    assert sorted(_segment_references(sr)) == [(seg.SOPInstanceUID, 1), (seg.SOPInstanceUID, 2)]
    evaluations = _evaluations(sr)
    assert ("areas-reliable", "373066001") in evaluations  # Yes
    assert ("spacing-source", "pixel-spacing") in evaluations
    assert ("gate-decision", "orientation_corrected:90") in evaluations
    assert ("qa-flag", "lung_size_asymmetry") in evaluations
    assert ("qa-flag", "orientation_corrected:90") not in evaluations  # a gate flag is written once
    assert ("review-required", "373066001") in evaluations
    assert [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence] == ["99LUNGSEG"]
    _check_model(sr, identity)


@pytest.mark.parametrize(("areas_cm2", "flags", "reason"), [
    (AREAS_CM2, ["pixel_spacing_implausible"], "pixel_spacing_implausible"),
    (None, [], "no_pixel_spacing"),
])
def test_unreliable_areas_are_never_written_in_cm2(tmp_path: Path, identity: ModelIdentity, areas_cm2, flags,
                                                   reason: str) -> None:
    source = make_cr("1.2.826.0.1.3680043.8.498.41.2", size=128, pixel_spacing=(0.1, 0.1))
    seg = _seg(source, identity)
    report = _report(source, seg, identity, areas_cm2=areas_cm2, areas_reliable=False, qa_flags=flags,
                     gate_flags=[], gate_passed=True, review=False,
                     spacing_source=None if areas_cm2 is None else "PixelSpacing")
    path = _write(build_report(report), tmp_path)
    assert _dciodvfy_errors(path) == []
    areas = read_areas(path)
    assert {side: (a.value, a.unit) for side, a in areas.items()} == {
        side: (value, "{pixels}") for side, value in AREAS_PX.items()}
    evaluations = _evaluations(pydicom.dcmread(path))
    assert ("areas-reliable", "373067005") in evaluations  # No
    assert ("areas-unreliable", reason) in evaluations
    assert ("gate-decision", "passed") in evaluations and ("review-required", "373067005") in evaluations


def test_reports_are_deterministic_in_their_uids(identity: ModelIdentity) -> None:
    source = make_cr("1.2.826.0.1.3680043.8.498.41.3")
    seg = _seg(source, identity)
    first, second = (build_report(_report(source, seg, identity)) for _ in range(2))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)
    assert first.SOPInstanceUID == derived_uid(source.SOPInstanceUID, "sr")
    assert first.SeriesNumber == int(source.SeriesNumber) + 3000


def test_inputs_that_cannot_make_a_report_are_refused(identity: ModelIdentity) -> None:
    source = make_cr("1.2.826.0.1.3680043.8.498.41.4")
    seg = _seg(source, identity)
    other_study = make_cr("1.2.826.0.1.3680043.8.498.41.5", study_uid="1.2.826.0.1.3680043.8.498.41.99")
    cases = [
        _report(other_study, seg, identity),  # the SEG is of another study
        _report(make_cr("1.2.826.0.1.3680043.8.498.41.6"), seg, identity),  # the SEG is of another image
        _report(source, seg, identity, segment_numbers={"right": 1, "left": 2}),  # no segment 2
        _report(source, seg, identity, segment_numbers={"middle": 1}),
    ]
    for report in cases:
        with pytest.raises(SRReportError) as caught:
            build_report(report)
        assert isinstance(caught.value, LungsegError) and isinstance(caught.value, ValueError)


def test_the_first_api_still_builds_the_same_report(tmp_path: Path, identity: ModelIdentity) -> None:
    """lungseg.edge_runtime.stages calls build_measurement_report until it is wired to build_report."""
    source = make_cr("1.2.826.0.1.3680043.8.498.41.7", pixel_spacing=(1.4, 1.4))
    seg = _seg(source, identity)
    values = LungMeasurements(areas_cm2={"total": 300.0, "right": 160.0, "left": 140.0},
                              areas_px={"total": 15000, "right": 8000, "left": 7000}, areas_reliable=True,
                              reliability_reason="lungs within the range", spacing_source="PixelSpacing",
                              qa_flags=("mirrored",))
    old = AlgorithmIdentity(name=identity.model_name, version=identity.model_version,
                            bundle_sha256=identity.bundle_sha256, device_uid=identity.device_uid,
                            software_version=identity.software_version)
    sr = build_measurement_report(source, seg, values, old, equipment=[identity.contributing_equipment()])
    path = _write(sr, tmp_path)
    assert _dciodvfy_errors(path) == []
    assert {side: a.value for side, a in read_areas(path).items()} == {"total": 300.0, "right": 160.0, "left": 140.0}
    _check_model(pydicom.dcmread(path), identity)
