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


def render_overlay(
    pixels: np.ndarray,
    mask: np.ndarray,
    *,
    legend: Sequence[str] = (),
    areas: Sequence[str] = (),
    caption: str = CAPTION,
    alpha: float = 0.35,
) -> np.ndarray:
    """Return a ``rows x columns x 3`` uint8 RGB image: radiograph, lung fill/outline and text.

    ``legend`` lines follow the "Lung" swatch line (e.g. the model name), ``areas``
    lines are written below them (ASCII only: Hershey fonts have no "²").
    """
    rows, columns = pixels.shape
    gray = to_gray8(pixels)
    rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    lung = mask.astype(bool)
    if lung.any():
        fill = np.array(FILL_RGB, dtype=np.float32)
        rgb[lung] = (rgb[lung].astype(np.float32) * (1 - alpha) + fill * alpha + 0.5).astype(np.uint8)
        contours, _ = cv2.findContours(lung.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        outline = max(1, round(max(rows, columns) / 500))
        cv2.drawContours(rgb, contours, -1, OUTLINE_RGB, outline, cv2.LINE_AA)
    scale, thickness, margin = text_metrics(rows, columns)
    lines = [("Lung (automatic segmentation)", TEXT_RGB)]
    lines += [(text, TEXT_RGB) for text in legend]
    lines += [(text, TEXT_RGB) for text in areas]
    _text_block(rgb, lines, (margin, margin), scale, thickness, margin, swatch=FILL_RGB)
    _text_block(rgb, [(caption, CAPTION_RGB)], (margin, rows - margin), scale, thickness, margin,
                anchor_bottom=True)
    return rgb


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
