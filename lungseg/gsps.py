"""A Grayscale Softcopy Presentation State (GSPS) that draws the lung contours over the original image.

The alternative to the overlay Secondary Capture for a PACS whose viewer applies presentation
states: nothing is re-encoded, the radiologist sees the original pixels with the lung outlines as
polylines and the areas (and any review banner) as text, and can switch the annotation off. Built
with highdicom; it references the source image, copies its VOI (or, where the source's window was
unusable, states the window the overlay used) and names the model as contributing equipment.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from lungseg import dicom_out
from lungseg.dicom_out import Provenance

#: the lung contours' colour: Okabe-Ito bluish green (the overlay's outline colour), as CIELab
CONTOUR_RGB = (0, 158, 115)
#: contours kept per image (the two lungs) and the most points per polyline (simplified beyond it)
MAX_CONTOURS = 2
MAX_POINTS = 512


def lung_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of the (at most two) largest lung regions, as ``(n, 2)`` (column, row) arrays in DICOM
    PIXEL units: the centre of pixel ``(r, c)`` is ``(c + 0.5, r + 0.5)``."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    kept = sorted(contours, key=cv2.contourArea, reverse=True)[:MAX_CONTOURS]
    out = []
    for contour in kept:
        epsilon = 0.0
        while len(contour) > MAX_POINTS:  # simplify, never drop: a viewer draws thousands of points slowly
            epsilon = epsilon * 2 or 0.5
            contour = cv2.approxPolyDP(contour, epsilon, True)
        points = contour.reshape(-1, 2).astype(np.float32) + 0.5
        if len(points) >= 3:
            out.append(np.vstack([points, points[:1]]))  # closed: the first point repeated
    return out


def _voi(radiograph_facts: dict[str, Any]) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The window the overlay used when the source's own VOI was missing or unusable (else ``None``:
    highdicom copies the source's)."""
    window = radiograph_facts.get("minmax_window")
    if not window:
        return None
    low, high = (float(v) for v in window)
    width = max(high - low, 1.0)
    return [hd.pr.SoftcopyVOILUTTransformation(window_center=low + width / 2, window_width=width)]


def _lut_shape(facts: dict[str, Any]) -> hd.PresentationLUTShapeValues:
    """INVERSE where the source is shown inverted (MONOCHROME1, or its own INVERSE shape): lungs dark."""
    inverted = bool(facts.get("inverted"))
    return hd.PresentationLUTShapeValues.INVERSE if inverted else hd.PresentationLUTShapeValues.IDENTITY


def build_gsps(reference: Dataset, mask: np.ndarray, text_lines: list[str], review: str, provenance: Provenance,
               facts: dict[str, Any]) -> Dataset:
    """The GSPS for ``reference`` (the source without pixels, :func:`lungseg.dicom_out.reference_dataset`):
    the contours of ``mask`` (native size) in one graphic layer, the text lines and ``review`` in another."""
    rows, columns = int(reference.Rows), int(reference.Columns)
    if mask.shape != (rows, columns):
        raise ValueError(f"mask {mask.shape} is not the source's {rows}x{columns}")
    colour = hd.color.CIELabColor.from_rgb(*CONTOUR_RGB)
    contours_layer = hd.pr.GraphicLayer("LUNG_CONTOURS", 1, "lung contours (lungseg)", display_color=colour)
    text_layer = hd.pr.GraphicLayer("LUNG_TEXT", 2, "lung areas and QA (lungseg)")
    graphics = [hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE, points, hd.pr.AnnotationUnitsValues.PIXEL)
                for points in lung_contours(mask)]
    margin = max(2.0, rows / 100)
    texts = []
    for i, line in enumerate(([review] if review else []) + text_lines):
        top = margin + i * rows / 30
        texts.append(hd.pr.TextObject(line[:1024], hd.pr.AnnotationUnitsValues.PIXEL,
                                      bounding_box=(margin, top, columns * 0.6, top + rows / 32),
                                      text_justification=hd.pr.TextJustificationValues.LEFT))
    source_uid = str(reference.SOPInstanceUID)
    annotations = [hd.pr.GraphicAnnotation([reference], contours_layer, graphic_objects=graphics)] if graphics else []
    if texts:
        annotations.append(hd.pr.GraphicAnnotation([reference], text_layer, text_objects=texts))
    with warnings.catch_warnings():  # pydicom/highdicom warnings quote patient data
        warnings.simplefilter("ignore")
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[reference],
            series_instance_uid=dicom_out.derived_uid(str(reference.SeriesInstanceUID), "gsps-series"),
            series_number=dicom_out.series_number(reference, 4000),
            sop_instance_uid=dicom_out.derived_uid(source_uid, "gsps"),
            instance_number=dicom_out.instance_number(reference),
            manufacturer=dicom_out.MANUFACTURER,
            manufacturer_model_name=f"{dicom_out.MODEL_NAME} {provenance.model_name}"[:64],
            # two values, as in the SC and SEG (highdicom's annotation reads tuple[str] but means tuple[str, ...])
            software_versions=cast(Any, (provenance.software_version,
                                         f"{provenance.model_name} {provenance.model_version}"[:64])),
            device_serial_number=provenance.device_uid or "unknown",
            content_label="LUNGSEG",
            content_description=f"Lung contours: {dicom_out.CAPTION}"[:64],
            graphic_annotations=annotations,
            graphic_layers=[contours_layer, text_layer],
            voi_lut_transformations=_voi(facts),
            # MONOCHROME1 (or an INVERSE shape in the source): displayed as the overlay shows it, lungs dark
            presentation_lut_transformation=hd.PresentationLUTTransformation(_lut_shape(facts)),
            contributing_equipment=[provenance.equipment()],
        )
    if "BodyPartExamined" not in gsps:
        gsps.Laterality = None  # type 2C: for an unknown body part (it may be paired), present and empty
    return gsps
