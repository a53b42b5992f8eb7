"""Draw the lung segmentation on the radiograph: the pixels of the Secondary Capture.

The radiograph stays at native size; lungs get a semi-transparent fill and an
outline, a legend names what is drawn (and the model), lung areas are written
when the pixel spacing is known, and a caption says what the image is for.
Text is drawn with ``cv2.putText`` at a scale proportional to the image size.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

CAPTION = "research use - not for diagnosis"
FILL_RGB = (0, 200, 110)
OUTLINE_RGB = (255, 215, 0)
TEXT_RGB = (255, 255, 255)
CAPTION_RGB = (255, 235, 59)
REVIEW_RGB = (200, 0, 0)
UNRELIABLE_RGB = (255, 170, 60)
MARKER_RGB = (255, 255, 255)
LEGEND_CONVENTION = "mask includes the lung behind the heart"
FONT = cv2.FONT_HERSHEY_SIMPLEX


def to_gray8(pixels: np.ndarray) -> np.ndarray:
    """Float [0, 1] MONOCHROME2 -> uint8."""
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def text_metrics(rows: int, columns: int) -> tuple[float, int, int]:
    """(font scale, stroke thickness, margin) for an image of this size."""
    long_side = max(rows, columns)
    scale = max(0.3, long_side / 1500.0)
    thickness = max(1, round(scale * 1.8))
    margin = max(2, round(long_side / 120))
    return scale, thickness, margin


def _text_block(image: np.ndarray, lines: Sequence[tuple[str, tuple[int, int, int]]], origin: tuple[int, int],
                scale: float, thickness: int, margin: int, swatch: tuple[int, int, int] | None = None,
                anchor_bottom: bool = False) -> None:
    sizes = [cv2.getTextSize(text, FONT, scale, thickness) for text, _ in lines]
    line_h = max(h + base for (_, h), base in sizes) + margin // 2
    swatch_w = line_h if swatch else 0
    width = max(w for (w, _), _ in sizes) + swatch_w + 2 * margin + (margin if swatch else 0)
    height = line_h * len(lines) + margin
    x0, y0 = origin
    if anchor_bottom:
        y0 = y0 - height
    x1, y1 = min(image.shape[1], x0 + width), min(image.shape[0], y0 + height)
    x0, y0 = max(0, x0), max(0, y0)
    region = image[y0:y1, x0:x1]
    region[:] = (region.astype(np.float32) * 0.35).astype(np.uint8)  # darkened backdrop
    for i, (text, colour) in enumerate(lines):
        baseline_y = y0 + margin // 2 + line_h * (i + 1) - sizes[i][1] - margin // 4
        x = x0 + margin
        if swatch and i == 0:
            top = baseline_y - sizes[i][0][1]
            side = sizes[i][0][1]
            cv2.rectangle(image, (x, top), (x + side, top + side), swatch, thickness=-1)
            cv2.rectangle(image, (x, top), (x + side, top + side), OUTLINE_RGB, thickness=max(1, thickness // 2))
            x += swatch_w + margin // 2
        cv2.putText(image, text, (x, baseline_y), FONT, scale, colour, thickness, cv2.LINE_AA)


def _blend_table(alpha: float) -> np.ndarray:
    """A 256 x 1 x 3 table: gray level -> that level blended with the lung fill colour (rounded half up)."""
    gray = np.arange(256, dtype=np.float32)[:, None]
    fill = np.array(FILL_RGB, dtype=np.float32)[None, :]
    return (gray * (1 - alpha) + fill * alpha + 0.5).astype(np.uint8)[:, None, :]


def render_overlay(
    pixels: np.ndarray,
    mask: np.ndarray,
    *,
    legend: Sequence[str] = (),
    areas: Sequence[str] = (),
    caption: str = CAPTION,
    alpha: float = 0.35,
    review: Sequence[str] = (),
    notes: Sequence[str] = (),
    patient_orientation: Sequence[str] | None = None,
) -> np.ndarray:
    """Return a ``rows x columns x 3`` uint8 RGB image: radiograph, lung fill/outline and text.

    ``legend`` lines follow the "Lung" swatch line and the annotation convention (e.g. the
    model name), ``areas`` lines are written below them (ASCII only: Hershey fonts have no "²").
    A non-empty ``review`` (reasons, in words) draws a red "REVIEW: ..." banner across the top
    and writes the areas in amber as unreliable; ``notes`` (e.g. "image was rotated ...") follow
    the legend. R/L markers come from ``patient_orientation`` (nothing is guessed without it).
    """
    rows, columns = pixels.shape
    gray = to_gray8(pixels)
    rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    lung = mask.astype(bool)
    if lung.any():
        cv2.copyTo(cv2.LUT(rgb, _blend_table(alpha)), lung.astype(np.uint8), rgb)
        contours, _ = cv2.findContours(lung.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        outline = max(1, round(max(rows, columns) / 500))
        cv2.drawContours(rgb, contours, -1, OUTLINE_RGB, outline, cv2.LINE_AA)
    scale, thickness, margin = text_metrics(rows, columns)
    top = _review_banner(rgb, review, scale, thickness, margin) if review else 0
    lines = [("Lung (automatic segmentation)", TEXT_RGB), (LEGEND_CONVENTION, TEXT_RGB)]
    lines += [(text, TEXT_RGB) for text in legend]
    lines += [(text, CAPTION_RGB) for text in notes]
    area_colour = UNRELIABLE_RGB if review else TEXT_RGB
    lines += [(text + (" (unreliable)" if review and not text.startswith("QA:") else ""), area_colour)
              for text in areas]
    _orientation_markers(rgb, patient_orientation, scale, thickness, margin)
    _text_block(rgb, lines, (margin, top + margin), scale, thickness, margin, swatch=FILL_RGB)
    _text_block(rgb, [(caption, CAPTION_RGB)], (margin, rows - margin), scale, thickness, margin,
                anchor_bottom=True)
    return rgb


def _wrap(words: Sequence[str], width: int, scale: float, thickness: int) -> list[str]:
    lines: list[str] = []
    for word in words:
        candidate = f"{lines[-1]}, {word}" if lines else word
        if lines and cv2.getTextSize(candidate, FONT, scale, thickness)[0][0] <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def _review_banner(image: np.ndarray, reasons: Sequence[str], scale: float, thickness: int, margin: int) -> int:
    """A red full-width "REVIEW: <reasons>" banner across the top; returns its height."""
    big, heavy = scale * 1.4, max(2, round(thickness * 1.5))
    width = image.shape[1] - 2 * margin
    lines = _wrap([f"REVIEW: {reasons[0]}", *reasons[1:]], width, big, heavy)
    line_h = max(cv2.getTextSize(t, FONT, big, heavy)[0][1] for t in lines) + 2 * margin
    height = min(image.shape[0], line_h * len(lines) + margin)
    image[:height] = REVIEW_RGB
    for i, text in enumerate(lines):
        cv2.putText(image, text, (margin, line_h * (i + 1) - margin // 2), FONT, big, TEXT_RGB, heavy, cv2.LINE_AA)
    return height


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}


def orientation_markers(patient_orientation: Sequence[str] | None) -> dict[str, str]:
    """Patient-side letters for the image edges from PatientOrientation (row, column directions).

    The row direction is where the image's right edge points (its opposite is the left edge), the
    column direction where the bottom edge points. Only R/L letters are returned: e.g. ``L\\F`` ->
    ``{"left": "R", "right": "L"}``.
    """
    if not patient_orientation or len(patient_orientation) < 2:
        return {}
    markers = {}
    edges = ((("left", "right"), patient_orientation[0]), (("top", "bottom"), patient_orientation[1]))
    for (near, far), value in edges:
        letters = str(value).upper()
        side = next((c for c in letters if c in "LR"), None)
        if side:
            markers[far], markers[near] = side, _OPPOSITE[side]
    return markers


def _orientation_markers(image: np.ndarray, patient_orientation: Sequence[str] | None, scale: float,
                         thickness: int, margin: int) -> None:
    rows, columns = image.shape[:2]
    big, heavy = scale * 2.0, max(2, thickness * 2)
    for edge, letter in orientation_markers(patient_orientation).items():
        (w, h), _ = cv2.getTextSize(letter, FONT, big, heavy)
        x, y = {"left": (margin, rows // 2 + h // 2), "right": (columns - w - margin, rows // 2 + h // 2),
                "top": (columns // 2 - w // 2, h + 4 * margin),
                "bottom": (columns // 2 - w // 2, rows - 4 * margin)}[edge]
        cv2.putText(image, letter, (x, y), FONT, big, (0, 0, 0), heavy + 2, cv2.LINE_AA)
        cv2.putText(image, letter, (x, y), FONT, big, MARKER_RGB, heavy, cv2.LINE_AA)


def side_names(patient_orientation: Sequence[str] | None) -> tuple[str, str]:
    """Names for the lung on the image's left and right.

    With PatientOrientation's row direction ``L`` (standard PA/AP display) the
    image-left lung is the patient's right; with ``R`` the reverse; otherwise
    (rotated, missing) the sides are named by the image.
    """
    row_direction = str(patient_orientation[0]).upper() if patient_orientation else ""
    if row_direction == "L":
        return "right lung", "left lung"
    if row_direction == "R":
        return "left lung", "right lung"
    return "image-left lung", "image-right lung"
