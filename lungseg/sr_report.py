"""DICOM SR Measurement Report (TID 1500) of a lung segmentation, built with highdicom.

One Comprehensive 3D SR per processed image, in the source's study (new series, UIDs derived from the
source's so a rerun rewrites the same instance), for :mod:`lungseg.segment` and the edge alike:

* observation context: the model as the observer device (TID 1004: its Device UID, name, manufacturer);
* one TID 1410 planar ROI group per lung segment of the SEG, referencing that segment and the source
  image; it holds the areas (``SCT Area``, finding site ``SCT Lung`` with laterality right, left or
  "right and left" for the total) whose side the segment covers, and says whether they are reliable;
* one TID 1501 image-level group referencing the source image, for the image's QA flags, the gate's
  decisions, "review required" and any area no segment covers (the total, when the SEG holds one
  segment per lung);
* every group names the algorithm (TID 4019: model name, version, bundle and model
  sha256, Device UID, backend, precision); Contributing Equipment names the model with its Device UID
  (:meth:`lungseg.provenance.ModelIdentity.contributing_equipment`), beside the source's acquisition
  equipment.

Areas whose physical size cannot be trusted (no usable pixel spacing, or one that fails the plausibility
check of :mod:`lungseg.spacing_check`) are never written in cm²: the groups give the areas in pixels
(UCUM ``{pixels}``) with "Lung areas reliable: No" and the reason, so no reader can take an impossible
cm² value for a measurement. What DICOM has no code for (reliability, spacing source, QA flags, gate
decisions) is coded in the private scheme ``99LUNGSEG``, declared in the Coding Scheme Identification
Sequence; a flag's code is the flag itself (``orientation_corrected:90``), its meaning the flag in words.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import validate_value

from lungseg.atomic import atomic_write
from lungseg.errors import LungsegError
from lungseg.provenance import MANUFACTURER, ModelIdentity, derived_uid

log = logging.getLogger(__name__)

SCHEME = "99LUNGSEG"  # private coding scheme for what DICOM has no code for
UNIT_CM2 = hd.sr.CodedConcept("cm2", "UCUM", "square centimeter")
UNIT_PIXELS = hd.sr.CodedConcept("{pixels}", "UCUM", "pixels")
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
AREAS_RELIABLE = hd.sr.CodedConcept("areas-reliable", SCHEME, "Lung areas reliable")
UNRELIABLE_REASON = hd.sr.CodedConcept("areas-unreliable", SCHEME, "Why the lung areas are unreliable")
SPACING_SOURCE = hd.sr.CodedConcept("spacing-source", SCHEME, "Pixel spacing source")
QA_FLAG = hd.sr.CodedConcept("qa-flag", SCHEME, "Quality flag")
GATE_DECISION = hd.sr.CodedConcept("gate-decision", SCHEME, "Image gate decision")
GATE_PASSED = hd.sr.CodedConcept("passed", SCHEME, "Passed: frontal chest radiograph, upright")
REVIEW_REQUIRED = hd.sr.CodedConcept("review-required", SCHEME, "Review required")
YES = hd.sr.CodedConcept.from_code(codes.SCT.Yes)
NO = hd.sr.CodedConcept.from_code(codes.SCT.No)
SIDES = ("total", "right", "left")
LATERALITY = {"total": codes.SCT.RightAndLeft, "right": codes.SCT.Right, "left": codes.SCT.Left}
_SIDE_OF_CODE = {code.value: side for side, code in LATERALITY.items()}
REASONS = {  # reason code -> meaning
    "pixel_spacing_implausible": "Pixel spacing implausible for the lungs measured",
    "no_pixel_spacing": "No usable pixel spacing",
    "unreliable": "Lung areas unreliable",
}
SR_SERIES_OFFSET = 3000  # the SR's series number: the source's + this (the SC's is + 1000, the SEG's + 2000)
# type 2 patient/study attributes: emptied (never dropped) when their value is invalid
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")
# what the SR copies from the source: patient, study, series/instance identification, equipment
_EVIDENCE_GROUPS = frozenset({0x0008, 0x0010, 0x0012, 0x0020, 0x0032, 0x0038, 0x0040})
_ALSO_COPIED = frozenset({"DeviceSerialNumber", "SoftwareVersions", "Rows", "Columns", "SamplesPerPixel",
                          "PixelRepresentation", "NumberOfFrames"})
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class SRReportError(LungsegError, ValueError):
    """The inputs cannot make a valid report (no lung segment, another study, no UIDs...)."""


class SpacingSource(str, Enum):
    """Where the areas' pixel spacing came from (the values :mod:`lungseg.dicom_decode` reports)."""

    PIXEL_SPACING = "PixelSpacing"
    IMAGER_PIXEL_SPACING = "ImagerPixelSpacing"
    IMAGER_PIXEL_SPACING_ERMF = "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"


_SPACING_CODES = {
    SpacingSource.PIXEL_SPACING: ("pixel-spacing", "Pixel Spacing (0028,0030)"),
    SpacingSource.IMAGER_PIXEL_SPACING: ("imager-spacing", "Imager Pixel Spacing (0018,1164), uncorrected"),
    SpacingSource.IMAGER_PIXEL_SPACING_ERMF: ("imager-ermf", "Imager Pixel Spacing corrected by the ERMF"),
}


@dataclass(frozen=True)
class LungAreas:
    """Lung areas in one unit (cm² or pixels); a side the caller did not measure is ``None``."""

    total: float
    right: float | None = None
    left: float | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> LungAreas:
        """From ``{"total": ..., "right": ..., "left": ...}`` (``total`` required)."""
        return cls(float(values["total"]), *(float(values[k]) if values.get(k) is not None else None
                                             for k in ("right", "left")))

    def items(self) -> list[tuple[str, float]]:
        """``(side, value)`` of every measured side, total first."""
        return [(side, float(v)) for side in SIDES if (v := getattr(self, side)) is not None]


@dataclass(frozen=True)
class LungAreaReport:
    """Everything one SR states about one image."""

    source: Dataset  # the segmented image (pixels not needed)
    seg: Dataset  # the DICOM Segmentation of its lungs, in the same study
    identity: ModelIdentity
    areas_cm2: LungAreas | None  # None: no usable spacing
    areas_px: LungAreas | None = None  # native pixels: written instead of cm² when the areas are unreliable
    spacing_source: SpacingSource | str | None = None
    areas_reliable: bool = True  # False (e.g. pixel_spacing_implausible): no cm² value is written
    unreliable_reason: str | None = None  # a code of REASONS (default: from the flags and the spacing)
    qa_flags: Sequence[str] = ()  # QA flags, "code" or "code:value" (lungseg.gate / lungseg.plausibility)
    gate_flags: Sequence[str] = ()  # the image gate's flags (corrections, doubts); not repeated as QA flags
    gate_passed: bool | None = None  # True: the gate ran and accepted the image (None: not reported)
    review: bool | None = None  # whether a human must review the result (None: not reported)
    segment_numbers: Mapping[str, int] | None = None  # side -> SEG segment number; None: read from the SEG

    @property
    def in_cm2(self) -> bool:
        """Whether the areas are written in cm² (reliable and measured in cm²)."""
        return self.areas_reliable and self.areas_cm2 is not None

    @property
    def reason(self) -> str | None:
        """The reason code when the areas are unreliable (``None`` when they are reliable)."""
        if self.in_cm2:
            return None
        if self.unreliable_reason:
            return self.unreliable_reason
        if "pixel_spacing_implausible" in (f.split(":")[0] for f in (*self.qa_flags, *self.gate_flags)):
            return "pixel_spacing_implausible"
        return "no_pixel_spacing" if self.areas_cm2 is None else "unreliable"


@dataclass(frozen=True)
class ReportedArea:
    """One area read back from a report."""

    value: float
    unit: str  # UCUM code: "cm2" or "{pixels}"
    segment_number: int | None  # the SEG segment its group references (None: image-level group)


def build_report(report: LungAreaReport, *, equipment: Sequence[hd.ContributingEquipment] | None = None,
                 series_instance_uid: str | None = None, sop_instance_uid: str | None = None,
                 series_number: int | None = None, instance_number: int | None = None) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Measurement Report of ``report`` (see the module's docstring).

    ``equipment``: the Contributing Equipment items naming this software (default: the identity's,
    :meth:`~lungseg.provenance.ModelIdentity.contributing_equipment`); the source's acquisition equipment
    is added before them. UIDs and numbers default to ones derived from the source's. pydicom's and highdicom's
    warnings are silenced here: they quote patient data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _build(report, equipment, series_instance_uid, sop_instance_uid, series_number, instance_number)


def _build(report: LungAreaReport, equipment: Sequence[hd.ContributingEquipment] | None,
           series_instance_uid: str | None, sop_instance_uid: str | None, series_number: int | None,
           instance_number: int | None) -> hd.sr.Comprehensive3DSR:
    source, emptied = evidence_dataset(report.source)
    if emptied:  # debug: the edge already warns once per file about the same source attributes
        log.debug("source attributes invalid for their VR were left empty or out of the SR",
                  extra={"event": "sr_source_fixed", "attributes": emptied})
    seg = report.seg
    _check_seg(source, seg)
    segments = dict(report.segment_numbers) if report.segment_numbers is not None else lung_segments(seg)
    _check_segments(seg, segments)
    identity = report.identity
    sop_uid = sop_instance_uid or derived_uid(source.SOPInstanceUID, "sr")
    algorithm = identity.sr_algorithm()
    by_segment: dict[int | None, list[hd.sr.Measurement]] = {n: [] for n in sorted(set(segments.values()))}
    for side, value, unit in _areas(report):
        by_segment.setdefault(segments.get(side), []).append(hd.sr.Measurement(
            name=codes.SCT.Area, value=value, unit=unit,
            finding_sites=[hd.sr.FindingSite(codes.SCT.Lung, laterality=LATERALITY[side])]))
    groups: list[Any] = []
    for number in sorted(n for n in by_segment if n is not None):
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(sop_uid, f"segment-{number}"),
                                                         identifier=f"lung segment {number}"),
            referenced_segment=hd.sr.ReferencedSegmentationFrame(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                frame_number=_frame_of_segment(seg, number), segment_number=number,
                source_image=hd.sr.SourceImageForSegmentation.from_source_image(source)),
            finding_type=codes.SCT.Lung, algorithm_id=algorithm, measurements=by_segment[number],
            qualitative_evaluations=_reliability(report)))
    image_level = by_segment.get(None, [])
    evaluations = [*(_reliability(report) if image_level else []), *_image_evaluations(report)]
    if image_level or evaluations:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(sop_uid, "image"),
                                                         identifier="image quality and gate"),
            finding_type=codes.SCT.Lung, algorithm_id=algorithm, measurements=image_level or None,
            qualitative_evaluations=evaluations or None,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)]))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid, name=identity.label[:64], manufacturer_name=identity.manufacturer[:64],
            model_name=identity.model_name[:64]))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PLAIN_CHEST_XRAY, imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, seg], content=content,
        series_instance_uid=series_instance_uid or derived_uid(source.SeriesInstanceUID, "sr-series"),
        series_number=series_number if series_number is not None else _number(source, "SeriesNumber", 0)
        + SR_SERIES_OFFSET,
        sop_instance_uid=sop_uid,
        instance_number=instance_number if instance_number is not None else max(1, _number(source, "InstanceNumber",
                                                                                           1)),
        manufacturer=identity.manufacturer, is_complete=True,
        series_description="Lung segmentation measurements (research use)",
        contributing_equipment=list(equipment) if equipment is not None else [identity.contributing_equipment()],
        transfer_syntax_uid=ExplicitVRLittleEndian)
    sr.ManufacturerModelName = f"{MANUFACTURER} {identity.model_name}"[:64]
    sr.add_new("SoftwareVersions", "LO", [identity.software_version[:64], identity.label[:64]])
    sr.CodingSchemeIdentificationSequence = [_scheme_item()]
    _segment_reference_without_frame(sr)
    return sr


def write_report(sr: Dataset, path: str | Path) -> Path:
    """Write ``sr`` as a DICOM file (with file meta), atomically; returns the path."""
    encoded = io.BytesIO()
    sr.save_as(encoded, enforce_file_format=True)
    return atomic_write(path, encoded.getvalue())


def read_areas(sr: Dataset | str | Path) -> dict[str, ReportedArea]:
    """The areas a report states, by side (``total``, ``right``, ``left``), read back with highdicom."""
    dataset = sr if isinstance(sr, Dataset) else dcmread(sr)
    document = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    report = document.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise SRReportError("not a TID 1500 Measurement Report")
    groups: list[tuple[Any, int | None]] = [(g, _segment_number(g)) for g in report.get_planar_roi_measurement_groups()]
    groups += [(g, None) for g in report.get_image_measurement_groups()]
    out: dict[str, ReportedArea] = {}
    for group, number in groups:
        for measurement in group.get_measurements(name=codes.SCT.Area):
            sides = [_SIDE_OF_CODE.get(site.laterality.value) for site in measurement.finding_sites
                     if site.laterality is not None]
            side = next((s for s in sides if s), None)
            if side is not None:
                out[side] = ReportedArea(float(measurement.value), str(measurement.unit.value), number)
    return out


def lung_segments(seg: Dataset) -> dict[str, int]:
    """Which SEG segment holds which side: ``{"total": n}`` for one "Lung" segment (then also right and
    left: it holds both), ``{"right": r, "left": l}`` (and ``total``) for one segment per lung. The side comes
    from the segmented property's laterality modifier, else from the label ("right"/"left")."""
    found: dict[str, int] = {}
    for item in seg.get("SegmentSequence", []):
        types = item.get("SegmentedPropertyTypeCodeSequence") or []
        label = str(item.get("SegmentLabel", "")).lower()
        if not any(str(t.get("CodeValue", "")) == codes.SCT.Lung.value for t in types) and "lung" not in label:
            continue
        modifiers = [str(m.get("CodeValue", "")) for t in types
                     for m in t.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        side = next((_SIDE_OF_CODE[m] for m in modifiers if m in _SIDE_OF_CODE), None)
        if side is None:
            side = "right" if "right" in label else "left" if "left" in label else "total"
        found.setdefault(side, int(item.SegmentNumber))
    if not found:
        raise SRReportError("the SEG has no lung segment (SegmentedPropertyType SCT 39607008 or a 'lung' label)")
    if set(found) == {"total"}:
        return dict.fromkeys(SIDES, found["total"])
    return found


def evidence_dataset(source: Dataset) -> tuple[Dataset, list[str]]:
    """The source's patient, study, identification, equipment and image size attributes (what the SR copies
    or references), with the values invalid for their VR emptied (type 2 patient/study attributes) or left out;
    returns the copy and the keywords fixed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings on invalid values quote patient data
        return _evidence(source)


def _evidence(source: Dataset) -> tuple[Dataset, list[str]]:
    out, fixed = Dataset(), []
    for elem in source:
        if elem.tag.is_private or (elem.tag.group not in _EVIDENCE_GROUPS and elem.keyword not in _ALSO_COPIED):
            continue
        if _valid(elem):
            out.add(copy.copy(elem))
        elif elem.keyword in _TYPE2:
            out.add_new(elem.tag, elem.VR, "")
            fixed.append(elem.keyword)
        else:
            fixed.append(elem.keyword or str(elem.tag))
    for keyword in _TYPE2:
        if keyword not in out:
            setattr(out, keyword, "")
    if out.PatientSex not in ("M", "F", "O", ""):
        out.PatientSex = ""
        fixed.append("PatientSex")
    terms = out.get("SpecificCharacterSet")
    terms = [terms] if isinstance(terms, str) else list(terms or [])
    if not all(not str(t).strip() or str(t).strip() in python_encoding for t in terms):
        out.SpecificCharacterSet = "ISO_IR 192"  # values were decoded with the default; keep them as UTF-8
        fixed.append("SpecificCharacterSet")
    elif not terms and _has_non_ascii(out):
        out.SpecificCharacterSet = "ISO_IR 100"  # undeclared 8-bit text read as Latin-1: declared, bytes kept
        fixed.append("SpecificCharacterSet")
    missing = [k for k in _REQUIRED_UIDS if not str(out.get(k, "") or "").strip()]
    if missing:
        raise SRReportError(f"the source has no {', '.join(missing)}: a report cannot reference it")
    return out, fixed


# --- compatibility: the first API (lungseg.edge_runtime.stages calls it until it is wired to build_report) --
@dataclass(frozen=True)
class AlgorithmIdentity:
    """The algorithm and model that produced the segmentation (superseded by :class:`ModelIdentity`)."""

    name: str
    version: str
    bundle_sha256: str
    device_uid: str
    software_version: str
    manufacturer: str = MANUFACTURER

    def model_identity(self) -> ModelIdentity:
        return ModelIdentity(model_name=self.name, model_version=self.version, version_source="caller",
                             bundle_sha256=self.bundle_sha256, model_file="", model_sha256="",
                             device_uid=self.device_uid, software_version=self.software_version,
                             manufacturer=self.manufacturer)


@dataclass(frozen=True)
class LungMeasurements:
    """What the report states about one image (superseded by :class:`LungAreaReport`)."""

    areas_cm2: dict[str, float] | None  # "total", "right", "left" (None: no usable spacing)
    areas_px: dict[str, int]  # the same keys, in native pixels
    areas_reliable: bool
    reliability_reason: str  # why the areas are (not) reliable, in words (the reason code is derived)
    spacing_source: str | None  # PixelSpacing, ImagerPixelSpacing, ImagerPixelSpacing/ERMF, or None
    qa_flags: Sequence[str] = field(default_factory=tuple)  # QA flags and gate decisions, as in the sidecar
    segment_number: int = 1  # the lung segment of the SEG


def build_measurement_report(source: Dataset, seg: Dataset, values: LungMeasurements, identity: AlgorithmIdentity,
                             *, equipment: Sequence[hd.ContributingEquipment] = (), series_number: int | None = None,
                             instance_number: int | None = None) -> hd.sr.Comprehensive3DSR:
    """:func:`build_report` from the first API's arguments (``equipment``: the items naming the software)."""
    report = LungAreaReport(
        source=source, seg=seg, identity=identity.model_identity(),
        areas_cm2=LungAreas.from_mapping(values.areas_cm2) if values.areas_cm2 else None,
        areas_px=LungAreas.from_mapping(values.areas_px) if values.areas_px else None,
        spacing_source=values.spacing_source, areas_reliable=values.areas_reliable, qa_flags=tuple(values.qa_flags),
        segment_numbers=dict.fromkeys(SIDES, values.segment_number))
    return build_report(report, equipment=list(equipment) or None, series_number=series_number,
                        instance_number=instance_number)


# --- helpers ---------------------------------------------------------------------------------------------
def _areas(report: LungAreaReport) -> list[tuple[str, float, hd.sr.CodedConcept]]:
    """``(side, value, unit)``: cm² (2 decimals) when reliable, else whole pixels (or nothing)."""
    if report.in_cm2 and report.areas_cm2 is not None:
        return [(side, round(value, 2), UNIT_CM2) for side, value in report.areas_cm2.items()]
    if report.areas_px is None:
        return []
    return [(side, float(round(value)), UNIT_PIXELS) for side, value in report.areas_px.items()]


def _code(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A ``99LUNGSEG`` code (a value over 16 characters goes to Long Code Value)."""
    return hd.sr.CodedConcept(value, SCHEME, meaning[:64])


def _spacing_code(source: SpacingSource | str | None) -> hd.sr.CodedConcept:
    if source is None:
        return _code("none", "No usable pixel spacing")
    try:
        return _code(*_SPACING_CODES[SpacingSource(source)])
    except ValueError:
        return _code(str(source), str(source))


def _reliability(report: LungAreaReport) -> list[hd.sr.QualitativeEvaluation]:
    out = [hd.sr.QualitativeEvaluation(AREAS_RELIABLE, YES if report.in_cm2 else NO),
           hd.sr.QualitativeEvaluation(SPACING_SOURCE, _spacing_code(report.spacing_source))]
    reason = report.reason
    if reason is not None:
        out.append(hd.sr.QualitativeEvaluation(UNRELIABLE_REASON, _code(reason, REASONS.get(reason, _words(reason)))))
    return out


def _image_evaluations(report: LungAreaReport) -> list[hd.sr.QualitativeEvaluation]:
    out = []
    if report.review is not None:
        out.append(hd.sr.QualitativeEvaluation(REVIEW_REQUIRED, YES if report.review else NO))
    if report.gate_passed and not report.gate_flags:
        out.append(hd.sr.QualitativeEvaluation(GATE_DECISION, GATE_PASSED))
    out += [hd.sr.QualitativeEvaluation(GATE_DECISION, _code(f, _words(f))) for f in dict.fromkeys(report.gate_flags)]
    gate = set(report.gate_flags)
    out += [hd.sr.QualitativeEvaluation(QA_FLAG, _code(f, _words(f))) for f in dict.fromkeys(report.qa_flags)
            if f not in gate]
    return out


def _words(flag: str) -> str:
    """A flag in words (:func:`lungseg.gate.flag_words`), up to 64 characters."""
    from lungseg.gate import flag_words  # the gate's models are not needed here: imported on first use

    return flag_words(flag)[:64]


def _segment_number(group: Any) -> int | None:
    frame = group.referenced_segmentation_frame
    numbers = frame.referenced_segment_numbers if frame is not None else None
    if numbers is None:
        return None
    return int(numbers) if isinstance(numbers, int) else int(next(iter(numbers)))


def _valid(elem: DataElement) -> bool:
    try:
        if elem.VR == "SQ":
            return all(_valid(e) for item in elem.value for e in item)
        values = elem.value if elem.VM > 1 else [elem.value]
        for value in values:
            if value is not None and value != "":  # IS, DSfloat, PersonName, DA...: validated as written
                raw = value if type(value) in (str, bytes, int, float) else str(value)
                validate_value(elem.VR, raw, pydicom_config.RAISE)
    except Exception:  # any value pydicom cannot even convert is invalid
        return False
    return True


def _has_non_ascii(ds: Dataset) -> bool:
    for elem in ds.iterall():
        if elem.VR in _TEXT_VRS and any(v is not None and not str(v).isascii()
                                        for v in (elem.value if elem.VM > 1 else [elem.value])):
            return True
    return False


def _number(ds: Dataset, keyword: str, default: int) -> int:
    try:
        return max(0, min(int(ds.get(keyword) or default), 2**31 - 1 - 10_000))
    except (TypeError, ValueError):
        return default


def _check_seg(source: Dataset, seg: Dataset) -> None:
    if "SegmentSequence" not in seg:
        raise SRReportError("the SEG data set has no SegmentSequence: not a Segmentation")
    if str(seg.get("StudyInstanceUID", "")) != str(source.StudyInstanceUID):
        raise SRReportError("the SEG belongs to another study than the source image")
    referenced = {str(i.ReferencedSOPInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])
                  for i in s.get("ReferencedInstanceSequence", [])}
    if referenced and str(source.SOPInstanceUID) not in referenced:
        raise SRReportError("the SEG does not reference the source image")


def _check_segments(seg: Dataset, segments: Mapping[str, int]) -> None:
    present = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    unknown = {side: n for side, n in segments.items() if side not in SIDES or int(n) not in present}
    if unknown:
        raise SRReportError(f"segment mapping {unknown} does not fit the SEG (sides {SIDES}, segments "
                            f"{sorted(present)})")


def _frame_of_segment(seg: Dataset, number: int) -> int:
    """The first SEG frame (1-based) that holds segment ``number``."""
    for index, frame in enumerate(seg.get("PerFrameFunctionalGroupsSequence", []), start=1):
        for ident in frame.get("SegmentIdentificationSequence", []):
            if int(ident.ReferencedSegmentNumber) == number:
                return index
    return 1


def _scheme_item() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "lungseg local codes (QA flags, gate decisions, area reliability)"
    item.CodingSchemeResponsibleOrganization = "lungseg project"
    return item


def _segment_reference_without_frame(node: Dataset) -> None:
    """A reference to a segment carries the segment number alone: PS3.3 forbids Referenced Frame Number
    beside Referenced Segment Number (highdicom writes both for a single-frame SEG; dciodvfy rejects it)."""
    for item in node.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            if "ReferencedSegmentNumber" in ref and "ReferencedFrameNumber" in ref:
                del ref.ReferencedFrameNumber
        _segment_reference_without_frame(item)


__all__ = ["SCHEME", "AlgorithmIdentity", "LungAreaReport", "LungAreas", "LungMeasurements", "ReportedArea",
           "SRReportError", "SpacingSource", "build_measurement_report", "build_report", "evidence_dataset",
           "lung_segments", "read_areas", "write_report"]
