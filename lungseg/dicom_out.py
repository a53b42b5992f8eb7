"""DICOM outputs: the overlay Secondary Capture and the binary lung Segmentation (highdicom).

Both belong to the source's study (patient and study attributes copied from it),
sit in a new series derived from the source series, and carry UIDs derived
deterministically from the source UIDs (so reprocessing a file can only rewrite
the same instance, never add a second one). Provenance (model name, version,
sha256, backend, precision) is recorded in ContributingEquipmentSequence and
DerivationDescription (SC) or the segment's AlgorithmIdentificationSequence (SEG).
"""

from __future__ import annotations

import copy
import datetime
import logging
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.valuerep import validate_value

import lungseg
from lungseg.bundle import Bundle, sha256_file

log = logging.getLogger(__name__)


def _memoize_iod_lookup() -> None:
    """Cache highdicom's "is this attribute in that IOD" look-up, a pure function of its arguments.

    Every SOP instance highdicom builds asks it twice (ContentDate, ContentTime), and each answer
    scans every attribute of every module of the IOD: about 2 ms per output on a small CPU.
    """
    import functools

    from highdicom import base

    original = base.is_attribute_in_iod
    if getattr(original, "__wrapped__", None) is not None:
        return
    cached = functools.lru_cache(maxsize=64)(original)

    @functools.wraps(original)
    def lookup(attribute: str, sop_class_uid: str, exclude_path_elements: Any = None) -> bool:
        if exclude_path_elements is None:
            return cached(str(attribute), str(sop_class_uid))
        return original(attribute, sop_class_uid, exclude_path_elements)

    base.is_attribute_in_iod = lookup


_memoize_iod_lookup()

MANUFACTURER = "lungseg"
MODEL_NAME = "lungseg-edge"
CAPTION = "research use - not for diagnosis"
UID_NAMESPACE = uuid.UUID("6f1c3c1e-2f0b-5c55-9a43-6c756e677365")  # fixed: lungseg derived UIDs

# Patient and study attributes copied to the outputs, with their VR for validation.
PATIENT_STUDY = (
    ("PatientName", "PN"), ("PatientID", "LO"), ("PatientBirthDate", "DA"), ("PatientSex", "CS"),
    ("AccessionNumber", "SH"), ("StudyID", "SH"), ("StudyDate", "DA"), ("StudyTime", "TM"),
    ("ReferringPhysicianName", "PN"),
)
OPTIONAL_COPIED = (("IssuerOfPatientID", "LO"), ("StudyDescription", "LO"), ("PatientAge", "AS"),
                   ("BodyPartExamined", "CS"))
LOSSY_SYNTAXES = {JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless}
BIPED = {"A", "P", "L", "R", "H", "F"}
# SCImage keyword -> source attribute: what highdicom's SCImage.from_ref_dataset copies
_REF_PATIENT_STUDY = (
    ("patient_id", "PatientID"), ("patient_name", "PatientName"), ("patient_birth_date", "PatientBirthDate"),
    ("patient_sex", "PatientSex"), ("accession_number", "AccessionNumber"), ("study_id", "StudyID"),
    ("study_date", "StudyDate"), ("study_time", "StudyTime"), ("referring_physician_name", "ReferringPhysicianName"),
)


class OutputVerificationError(RuntimeError):
    """A written output did not read back as what was written."""


def software_version() -> str:
    """This package's installed version."""
    try:
        return version("lungseg")
    except Exception:
        return getattr(lungseg, "__version__", "unknown")


def derived_uid(source_uid: str, kind: str) -> str:
    """``2.25.<uuid5>`` from a source UID and a purpose; the same inputs always give the same UID."""
    return "2.25." + str(uuid.uuid5(UID_NAMESPACE, f"{source_uid}|lungseg-{kind}").int)


@dataclass(frozen=True)
class Provenance:
    """What produced an output."""

    model_name: str
    model_version: str
    model_sha256: str
    model_file: str
    backend: str
    precision: str
    software_version: str
    threshold: float
    bundle_sha256: str = ""  # identity of the whole bundle (lungseg.bundle.Bundle.sha256)
    device_uid: str = ""  # Contributing Equipment's Device UID, derived from bundle_sha256

    @classmethod
    def of(cls, bundle: Bundle, model_file: Path, backend: str, precision: str, threshold: float) -> Provenance:
        """The provenance of outputs made with ``model_file`` of ``bundle`` (the model file hashed here)."""
        return cls(model_name=bundle.name, model_version=bundle.version, model_sha256=sha256_file(model_file),
                   model_file=model_file.name, backend=backend, precision=precision,
                   software_version=software_version(), threshold=threshold, bundle_sha256=bundle.sha256,
                   device_uid=bundle.device_uid)

    def description(self) -> str:
        bundle = f", bundle sha256 {self.bundle_sha256}" if self.bundle_sha256 else ""
        return (f"Lung segmentation by lungseg {self.software_version}: model {self.model_name} "
                f"{self.model_version} ({self.model_file}, sha256 {self.model_sha256}{bundle}), backend "
                f"{self.backend}, precision {self.precision}, threshold {self.threshold:g}. {CAPTION}.")

    def equipment(self) -> hd.ContributingEquipment:
        """The Contributing Equipment item naming this software and model (IHE AI Results: the model is a
        device whose Device UID changes with it)."""
        item = hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=f"{MODEL_NAME} {self.model_name}"[:64],
            software_versions=[self.software_version, f"{self.model_name} {self.model_version}"[:64]],
            contribution_datetime=datetime.datetime.now(),
            contribution_description=self.description()[:1024],
        )
        if self.device_uid:
            item.DeviceUID = self.device_uid
        return item


def _valid(vr: str, value: Any) -> bool:
    if value is None or value == "":
        return True
    if vr == "CS" and isinstance(value, str) and len(value) > 16:
        return False
    try:
        validate_value(vr, value, pydicom_config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _positive_pair(value: Any) -> bool:
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return False
    return len(values) == 2 and all(v > 0 for v in values)


def _has_non_ascii(ds: Dataset) -> bool:
    for elem in ds.iterall():
        values = elem.value if isinstance(elem.value, (list, tuple)) or elem.VM > 1 else [elem.value]
        if elem.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC") and any(
                not str(v).isascii() for v in values if v is not None):
            return True
    return False


def reference_dataset(ds: Dataset) -> tuple[Dataset, list[str]]:
    """A pixel-free copy of the source that highdicom can build outputs from.

    Each element is copied shallowly: pydicom assigns a value by changing the element in place,
    so the copy needs its own elements, but not its own copies of their values (none is changed
    in place here or by highdicom; a deep copy cost about as much as writing the SC). Adds file
    meta when the source had none, fills missing type-2 patient/study attributes with empty
    values, and empties values that are invalid for their VR (so the outputs stay valid DICOM);
    returns the copy and the keywords emptied.
    """
    ref = Dataset()
    for elem in ds:
        group = elem.tag.group
        if group == 0x7FE0 or 0x6000 <= group <= 0x60FF or elem.tag.is_private:
            continue
        ref.add(copy.copy(elem))
    fixed: list[str] = []
    for keyword, vr in PATIENT_STUDY:
        value = ref.get(keyword)
        if value is None:
            setattr(ref, keyword, "")
        elif not _valid(vr, value) or (keyword == "PatientSex" and value not in ("M", "F", "O", "")):
            setattr(ref, keyword, "")
            fixed.append(keyword)
    for keyword, vr in OPTIONAL_COPIED:
        if keyword in ref and not _valid(vr, ref.get(keyword)):
            del ref[keyword]
            fixed.append(keyword)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ref.get(keyword)
        if value is not None and not _positive_pair(value):
            del ref[keyword]  # zero or malformed spacing: say nothing rather than something wrong
            fixed.append(keyword)
    if "SpecificCharacterSet" not in ref and _has_non_ascii(ref):
        # pydicom read the undeclared 8-bit text as Latin-1; declaring it keeps the bytes unchanged
        ref.SpecificCharacterSet = "ISO_IR 100"
        fixed.append("SpecificCharacterSet")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        implicit = bool(getattr(ds, "original_encoding", (True, True))[0])
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ref.file_meta = FileMetaDataset()
    ref.file_meta.TransferSyntaxUID = UID(syntax)
    ref.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ref.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ref, fixed


def _source_reference(ref: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(
        codes.DCM.SourceImageForImageProcessingOperation)]
    return item


def series_number(ref: Dataset, offset: int) -> int:
    """The output series' number: the source's plus ``offset`` (1000 SC, 2000 SEG, 4000 GSPS)."""
    try:
        number = int(ref.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return max(0, min(number, 2**31 - 1 - 10_000)) + offset


def instance_number(ref: Dataset) -> int:
    """The source's instance number (1 when missing or invalid)."""
    try:
        return max(1, int(ref.get("InstanceNumber") or 1))
    except (TypeError, ValueError):
        return 1


def _copy_common(target: Dataset, ref: Dataset) -> None:
    if "SpecificCharacterSet" in ref:
        target.SpecificCharacterSet = ref.SpecificCharacterSet
    for keyword, _ in OPTIONAL_COPIED:
        if keyword in ref and ref.get(keyword) not in (None, ""):
            setattr(target, keyword, ref.get(keyword))
    source_syntax = ref.file_meta.TransferSyntaxUID
    if ref.get("LossyImageCompression") == "01" or source_syntax in LOSSY_SYNTAXES:
        target.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in ref:
                setattr(target, keyword, ref.get(keyword))


SC_SYNTAXES = {"explicit": ExplicitVRLittleEndian, "rle": RLELossless, "jpegls": JPEGLSLossless}


def _acquisition_equipment(ref: Dataset) -> hd.ContributingEquipment | None:
    """The source's acquisition equipment, as ``highdicom.ContributingEquipment.for_image_acquisition``
    gives it, without that method's IOD-table scan (the source is known to be a CR/DX image)."""
    manufacturer = ref.get("Manufacturer")
    if manufacturer in (None, ""):
        return None
    when = ref.get("AcquisitionDateTime")
    date, clock = ref.get("AcquisitionDate"), ref.get("AcquisitionTime")
    if when is None and isinstance(date, datetime.date) and isinstance(clock, datetime.time):
        when = datetime.datetime.combine(date, clock)
    try:
        return hd.ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=codes.DCM.AcquisitionEquipment,
            manufacturer_model_name=ref.get("ManufacturerModelName"),
            software_versions=ref.get("SoftwareVersions"),
            device_serial_number=ref.get("DeviceSerialNumber"),
            institution_name=ref.get("InstitutionName"),
            institutional_department_name=ref.get("InstitutionalDepartmentName"),
            institution_address=ref.get("InstitutionAddress"),
            station_name=ref.get("StationName"),
            contribution_datetime=when,
            contribution_description="Acquisition equipment of the source image(s)",
        )
    except Exception:  # as highdicom does: equipment it cannot describe is left out
        return None


def build_sc(ref: Dataset, rgb: np.ndarray, provenance: Provenance, *, syntax: str = "explicit",
             comments: str = "") -> Dataset:
    """The overlay Secondary Capture: RGB, Explicit VR LE (default), RLE Lossless or JPEG-LS Lossless."""
    if syntax not in SC_SYNTAXES:
        raise ValueError(f"SC syntax must be one of {sorted(SC_SYNTAXES)}, not {syntax!r}")
    orientation = [str(v) for v in (ref.get("PatientOrientation") or [])]
    valid_orientation = len(orientation) == 2 and all(v in BIPED for v in orientation)
    acquisition = _acquisition_equipment(ref)
    kwargs: dict[str, Any] = {
        "pixel_array": rgb,
        "photometric_interpretation": "RGB",
        "bits_allocated": 8,
        "coordinate_system": "PATIENT",
        "study_instance_uid": ref.StudyInstanceUID,
        "series_instance_uid": derived_uid(ref.SeriesInstanceUID, "sc-series"),
        "series_number": series_number(ref, 1000),
        "sop_instance_uid": derived_uid(ref.SOPInstanceUID, "sc"),
        "instance_number": instance_number(ref),
        "manufacturer": MANUFACTURER,
        **{keyword: ref.get(attribute) for keyword, attribute in _REF_PATIENT_STUDY},
        "patient_orientation": tuple(orientation) if valid_orientation else ("L", "F"),
        "contributing_equipment": [*([acquisition] if acquisition is not None else []), provenance.equipment()],
        "specific_character_set": ref.get("SpecificCharacterSet"),
        "series_description": "Lung segmentation overlay (research use)",
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": provenance.software_version,
    }
    uid = SC_SYNTAXES[syntax]
    try:
        sc = hd.sc.SCImage(transfer_syntax_uid=uid, **kwargs)
    except (RuntimeError, ValueError, ImportError) as exc:
        if uid == ExplicitVRLittleEndian:
            raise
        log.warning("%s encoding failed (%s); writing Explicit VR Little Endian", uid.name, exc)
        sc = hd.sc.SCImage(transfer_syntax_uid=ExplicitVRLittleEndian, **kwargs)
    if not valid_orientation:
        sc.PatientOrientation = orientation or None  # type: ignore[assignment]  # None: an empty value
    _copy_common(sc, ref)
    if "BodyPartExamined" not in sc:
        sc.Laterality = None  # type: ignore[assignment]  # type 2C: unknown body part may be paired
    sc.BurnedInAnnotation = "NO"  # the drawn text names no patient
    sc.ImageComments = (comments or CAPTION)[:10240]
    sc.DerivationDescription = provenance.description()[:1024]
    sc.SourceImageSequence = [_source_reference(ref)]
    return sc


def build_seg(ref: Dataset, mask: np.ndarray, provenance: Provenance, *, review: str = "") -> Dataset:
    """A BINARY Segmentation with one segment "Lung", pixel-for-pixel on the source."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=provenance.model_name[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=provenance.model_version[:64],
        source=MANUFACTURER,
        parameters={
            "sha256": provenance.model_sha256,
            "backend": provenance.backend,
            "precision": provenance.precision,
            "threshold": f"{provenance.threshold:g}",
        },
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Lung",
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Lung,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=[ref],
        pixel_array=mask.astype(np.uint8)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=derived_uid(ref.SeriesInstanceUID, "seg-series"),
        series_number=series_number(ref, 2000),
        sop_instance_uid=derived_uid(ref.SOPInstanceUID, "seg"),
        instance_number=instance_number(ref),
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=provenance.software_version,
        device_serial_number="none",
        series_description="Lung segmentation (research use)",
        content_label="LUNG",
        content_description=(review or CAPTION)[:64],
        omit_empty_frames=False,
        contributing_equipment=[provenance.equipment()],
    )
    shared = seg.SharedFunctionalGroupsSequence[0]
    if ("FrameOfReferenceUID" not in ref and "PixelMeasuresSequence" in shared
            and "SliceThickness" not in shared.PixelMeasuresSequence[0]):
        # A projection radiograph has no slice thickness, and highdicom (0.2x) cannot read back a
        # Pixel Measures item without one; the spacing stays in the source image it references.
        del shared.PixelMeasuresSequence
    if "PatientOrientation" not in seg:
        seg.PatientOrientation = ref.get("PatientOrientation") or None
    if review:  # a flagged result: say so where a viewer shows the segment (ST, up to 1024 characters)
        seg.SegmentSequence[0].SegmentDescription = f"{review}. {CAPTION}"[:1024]
        seg.SeriesDescription = "Lung segmentation (REVIEW, research use)"
    _copy_common(seg, ref)
    return seg


def verify_sc(path: Any, rgb: np.ndarray, *, decode: bool = False) -> None:
    """Parse the SC as written (a path, or a file-like holding the bytes written): it must parse
    completely and describe exactly the image drawn.

    Always: every element parses, Rows/Columns/SamplesPerPixel/BitsAllocated match ``rgb``
    and the pixel data holds exactly its bytes (uncompressed) or one non-empty frame
    (compressed). ``decode=True`` also decodes it and compares every pixel (slower).
    """
    from pydicom import dcmread

    back = dcmread(path)
    for _ in back.iterall():  # a malformed element raises here
        pass
    rows, columns = rgb.shape[:2]
    header = (int(back.Rows), int(back.Columns), int(back.SamplesPerPixel), int(back.BitsAllocated))
    if header != (rows, columns, 3, 8):
        raise OutputVerificationError(f"secondary capture header says {header}, not ({rows}, {columns}, 3, 8)")
    syntax = back.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        from pydicom.encaps import generate_frames

        frames = list(generate_frames(back.PixelData, number_of_frames=1))
        if len(frames) != 1 or not frames[0]:
            raise OutputVerificationError("secondary capture holds no compressed frame")
    elif len(back.PixelData) != rgb.nbytes + (rgb.nbytes % 2):
        raise OutputVerificationError(f"secondary capture pixel data is {len(back.PixelData)} bytes, "
                                      f"not {rgb.nbytes}")
    elif not np.array_equal(np.frombuffer(back.PixelData, np.uint8, count=rgb.nbytes).reshape(rgb.shape), rgb):
        raise OutputVerificationError("secondary capture pixel data differs from the image drawn")
    if decode:
        pixels = back.pixel_array
        if pixels.shape != rgb.shape or not np.array_equal(pixels, rgb):
            raise OutputVerificationError(f"secondary capture read back as {pixels.shape}, not the image drawn")


def verify_seg(path: Any, mask: np.ndarray) -> None:
    """Read the written SEG back and decode it; its frame must equal the mask."""
    from pydicom import dcmread

    back = dcmread(path)
    frame = np.asarray(back.pixel_array).reshape(mask.shape)
    if not np.array_equal(frame.astype(bool), mask.astype(bool)):
        raise OutputVerificationError("segmentation read back differs from the mask")
