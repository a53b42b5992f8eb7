"""Draw the lung segmentation on the radiograph: the pixels of the Secondary Capture.

The radiograph is shown at its full, native resolution (the presentation-ready 8-bit image);
the lungs get an outline (style ``outline``, the default) or an outline over a translucent fill
(``filled-outline``), in colours that stay apart for colour-blind readers (the Okabe-Ito
palette: orange outline, bluish-green fill, vermillion review banner, yellow for unreliable
numbers). The text (review banner, legend with areas and the model, caption, R/L markers) is
laid out *outside* the lung fields: each block goes to the first place, among the image's
top and bottom bands and its four corners, where it overlaps neither the (slightly dilated)
mask nor a block already placed, at the largest text size that fits, down to a legible
minimum, with a shorter wording tried before giving up. Lines are wrapped, never cut. Where even
that cannot keep the text off the lungs (a small image filled by lung), the image is kept whole
and untouched and the text goes to a strip added below it (:attr:`Overlay.strip_rows`): the SC
then has more rows than the source rather than text over the lungs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from lungseg.radiograph import to_gray8

CAPTION = "research use - not for diagnosis"
STYLES = ("outline", "filled-outline")
OUTLINE_RGB = (230, 159, 0)  # Okabe-Ito orange
FILL_RGB = (0, 158, 115)  # Okabe-Ito bluish green
TEXT_RGB = (255, 255, 255)
CAPTION_RGB = (240, 228, 66)  # Okabe-Ito yellow
REVIEW_RGB = (213, 94, 0)  # Okabe-Ito vermillion
UNRELIABLE_RGB = (240, 228, 66)
MARKER_RGB = (255, 255, 255)
LEGEND_CONVENTION = "mask includes the lung behind the heart"
FONT = cv2.FONT_HERSHEY_SIMPLEX
MIN_SCALE = 0.3  # Hershey simplex at 0.3: capitals about 7 px high, the smallest still read on a workstation
SMALL_IMAGE_MIN_SCALE = 0.25  # below 600 px a viewer magnifies the whole image: 6 px capitals read as 15-20
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

__all__ = ["CAPTION", "FILL_RGB", "OUTLINE_RGB", "REVIEW_RGB", "STYLES", "Overlay", "orientation_markers",
           "render_overlay", "text_metrics", "to_gray8", "turned_orientation"]


def text_metrics(rows: int, columns: int) -> tuple[float, int, int]:
    """(preferred font scale, stroke thickness, margin) for an image of this size."""
    long_side = max(rows, columns)
    scale = max(MIN_SCALE, long_side / 1500.0)
    thickness = max(1, round(scale * 1.8))
    margin = max(2, round(long_side / 120))
    return scale, thickness, margin


@dataclass
class Overlay:
    """The rendered SC pixels and where the text went."""

    rgb: np.ndarray
    boxes: dict[str, Box] = field(default_factory=dict)  # "banner", "areas", "legend", "notes", "caption", "marker:*"
    strip_rows: int = 0  # rows of the text strip added below the image (0: the SC has the source's size)


class _KeepOut:
    """O(1) "how much lung (or text) is under this box" through an integral image."""

    def __init__(self, mask: np.ndarray, margin: int) -> None:
        lung = mask.astype(np.uint8)
        near: np.ndarray = lung
        if margin > 0 and lung.any():
            near = cv2.dilate(lung, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * margin + 1, 2 * margin + 1)))
        self.rows, self.columns = lung.shape
        self._lung = cv2.integral(lung, sdepth=cv2.CV_32S)
        self._near = cv2.integral(near, sdepth=cv2.CV_32S)  # the lung and a margin around it
        self.taken: list[Box] = []

    @staticmethod
    def _count(s: np.ndarray, box: Box) -> int:
        x0, y0, x1, y1 = box
        return int(s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0])

    def lung(self, box: Box) -> int:
        """Lung pixels under ``box``."""
        return self._count(self._lung, box)

    def near(self, box: Box) -> int:
        """Pixels of the lung or its margin under ``box``."""
        return self._count(self._near, box)

    def free(self, box: Box) -> bool:
        x0, y0, x1, y1 = box
        if x0 < 0 or y0 < 0 or x1 > self.columns or y1 > self.rows:
            return False
        return self.near(box) == 0 and not any(_intersect(box, t) for t in self.taken)


def _intersect(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@dataclass
class _Block:
    name: str
    lines: list[tuple[str, tuple[int, int, int]]]
    full_width: bool = False  # the review banner spans the image
    background: tuple[int, int, int] | None = None  # None: the image darkened behind the text
    swatch: tuple[int, int, int] | None = None
    emphasis: float = 1.0  # text scale relative to the legend's
    compact: list[tuple[str, tuple[int, int, int]]] | None = None  # shorter lines, tried before covering lung


def _wrap(text: str, width: int, scale: float, thickness: int) -> list[str]:
    """``text`` broken at spaces (or, for one over-long word, between characters) into lines <= ``width`` px."""
    out: list[str] = []
    for word in text.split(" "):
        candidate = f"{out[-1]} {word}" if out else word
        if out and cv2.getTextSize(candidate, FONT, scale, thickness)[0][0] <= width:
            out[-1] = candidate
            continue
        while cv2.getTextSize(word, FONT, scale, thickness)[0][0] > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and cv2.getTextSize(word[:cut], FONT, scale, thickness)[0][0] > width:
                cut -= 1
            out.append(word[:cut])
            word = word[cut:]
        out.append(word)
    return out


@dataclass
class _Sized:
    lines: list[tuple[str, tuple[int, int, int]]]
    scale: float
    thickness: int
    line_h: int
    width: int
    height: int


def _size(block: _Block, scale: float, max_width: int, margin: int) -> _Sized | None:
    scale *= block.emphasis
    thickness = max(1, round(scale * 1.8))
    swatch_w = 0
    if block.swatch is not None:
        swatch_w = cv2.getTextSize("Ag", FONT, scale, thickness)[0][1] + margin
    inner = max_width - 2 * margin - swatch_w
    if inner <= 0:
        return None
    lines = [(part, colour) for text, colour in block.lines for part in _wrap(text, inner, scale, thickness)]
    sizes = [cv2.getTextSize(text, FONT, scale, thickness) for text, _ in lines]
    if any(w > inner for (w, _), _ in sizes):
        return None
    line_h = max(h + base for (_, h), base in sizes) + max(1, margin // 2)
    width = max(w for (w, _), _ in sizes) + 2 * margin + swatch_w
    return _Sized(lines, scale, thickness, line_h, width, line_h * len(lines) + margin)


def _candidates(block: _Block, sized: _Sized, keep: _KeepOut, margin: int) -> list[Box]:
    rows, columns = keep.rows, keep.columns
    width = columns if block.full_width else sized.width
    height = sized.height
    # corners sit inside a full-width banner already placed on that side, not under it
    top_band = max((b[3] for b in keep.taken if b[1] == 0 and b[2] - b[0] == columns), default=0)
    bottom_band = min((b[1] for b in keep.taken if b[3] == rows and b[2] - b[0] == columns), default=rows)
    left, right = (0, columns - width) if block.full_width else (margin, columns - width - margin)
    top, bottom = (0, rows - height) if block.full_width else (top_band + margin, bottom_band - height - margin)
    centre = (columns - width) // 2
    spots = [(left, top), (left, bottom)] if block.full_width else [
        (left, top), (right, top), (left, bottom), (right, bottom), (centre, bottom), (centre, top)]
    return [(x, y, x + width, y + height) for x, y in spots]


Placement = tuple[_Block, _Sized, Box]


def _spot(block: _Block, keep: _KeepOut, scale: float, margin: int) -> tuple[_Sized, Box] | None:
    """The first spot, at this text size, that keeps ``block`` off the lungs (and their margin) and the others."""
    columns = keep.columns
    widths = [columns] if block.full_width else [columns // 2, columns // 3, columns - 2 * margin]
    for max_width in widths:
        sized = _size(block, scale, max_width, margin)
        if sized is None:
            continue
        for box in _candidates(block, sized, keep, margin):
            if keep.free(box):
                return sized, box
    return None


def _layout(blocks: list[_Block], keep: _KeepOut, scale0: float, margin: int) -> list[Placement] | None:
    """Every block off the lungs at one text size, the largest that works (each block in its full wording,
    else its compact one); ``None`` when even the smallest size leaves a block without room."""
    smallest = SMALL_IMAGE_MIN_SCALE if max(keep.rows, keep.columns) < 600 else MIN_SCALE
    scale = scale0
    while True:
        keep.taken.clear()
        placed: list[Placement] = []
        for block in blocks:
            found = _spot(block, keep, scale, margin)
            if found is None and block.compact is not None:
                block = _Block(block.name, block.compact, block.full_width, block.background, block.swatch,
                               block.emphasis)
                found = _spot(block, keep, scale, margin)
            if found is None:
                break
            keep.taken.append(found[1])
            placed.append((block, *found))
        else:
            return placed
        if scale <= smallest:
            keep.taken.clear()
            return None
        scale = max(smallest, scale * 0.9)


def _draw(image: np.ndarray, block: _Block, sized: _Sized, box: Box, margin: int) -> None:
    x0, y0, x1, y1 = box
    region = image[y0:y1, x0:x1]
    if block.background is not None:
        region[:] = block.background
    else:
        region[:] = (region.astype(np.uint16) * 90 // 256).astype(np.uint8)  # darkened backdrop
    x_text = x0 + margin
    if block.swatch is not None:
        side = cv2.getTextSize("Ag", FONT, sized.scale, sized.thickness)[0][1]
        top = y0 + margin // 2 + (sized.line_h - side) // 2
        cv2.rectangle(image, (x_text, top), (x_text + side, top + side), block.swatch, thickness=max(1, side // 4))
        x_text += side + margin
    for i, (text, colour) in enumerate(sized.lines):
        baseline = y0 + margin // 2 + sized.line_h * (i + 1) - max(2, sized.line_h // 4)
        cv2.putText(image, text, (x_text, baseline), FONT, sized.scale, colour, sized.thickness, cv2.LINE_AA)


def _blend_table(alpha: float) -> np.ndarray:
    """A 256 x 1 x 3 table: gray level -> that level blended with the lung fill colour (rounded half up)."""
    gray = np.arange(256, dtype=np.float32)[:, None]
    fill = np.array(FILL_RGB, dtype=np.float32)[None, :]
    return (gray * (1 - alpha) + fill * alpha + 0.5).astype(np.uint8)[:, None, :]


def render_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    legend: Sequence[str] = (),
    areas: Sequence[str] = (),
    areas_unreliable: bool = False,
    caption: str = CAPTION,
    style: str = "outline",
    alpha: float = 0.3,
    review: Sequence[str] = (),
    notes: Sequence[str] = (),
    patient_orientation: Sequence[str] | None = None,
) -> Overlay:
    """The SC's ``rows x columns x 3`` uint8 RGB image: radiograph, lung outline (and fill), text off the lungs.

    ``image`` is the radiograph as uint8 (or float [0, 1]) at the size the SC shows; ``mask`` the
    lung mask at that size. ``legend`` lines follow the outline's swatch line (e.g. the model),
    ``areas`` lines come next (ASCII only: Hershey fonts have no "²"), in yellow and marked
    "(unreliable)" when ``review`` is non-empty or ``areas_unreliable``. A non-empty ``review``
    (reasons, in words) draws a full-width vermillion "REVIEW: ..." banner above or below the
    lungs. R/L markers come from ``patient_orientation``, which must describe these pixels
    (see :func:`turned_orientation`); nothing is guessed without it.
    """
    if style not in STYLES:
        raise ValueError(f"overlay style {style!r}: choose from {STYLES}")
    gray = image if image.dtype == np.uint8 else to_gray8(image)
    rows, columns = gray.shape
    rgb = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    lung = mask.astype(np.uint8)
    scale, thickness, margin = text_metrics(rows, columns)
    if lung.any():
        if style == "filled-outline":
            cv2.copyTo(cv2.LUT(rgb, _blend_table(alpha)), lung, rgb)
        contours, _ = cv2.findContours(lung, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, OUTLINE_RGB, max(1, round(max(rows, columns) / 500)), cv2.LINE_AA)
    keep = _KeepOut(lung, margin)
    unreliable = bool(review) or areas_unreliable
    blocks = []
    if review:
        blocks.append(_Block("banner", [("REVIEW: " + ", ".join(review), TEXT_RGB)], full_width=True,
                             background=REVIEW_RGB, emphasis=1.3))
    # separate blocks, each placed on its own: small ones find room beside the lungs where one tall block would not
    area_lines = [(text + (" (unreliable)" if unreliable and not text.startswith("QA:") else ""),
                   UNRELIABLE_RGB if unreliable else TEXT_RGB) for text in areas]
    if area_lines:
        compact_areas = [line for line in area_lines if not line[0].startswith("QA:")]
        blocks.append(_Block("areas", area_lines, compact=compact_areas))
    legend_lines = [("Lung outline (automatic segmentation)", TEXT_RGB), (LEGEND_CONVENTION, TEXT_RGB)]
    blocks.append(_Block("legend", legend_lines + [(text, TEXT_RGB) for text in legend], swatch=OUTLINE_RGB,
                         compact=[("Lung outline (automatic)", TEXT_RGB)]))
    if notes:
        blocks.append(_Block("notes", [(text, CAPTION_RGB) for text in notes]))
    blocks.append(_Block("caption", [(caption, CAPTION_RGB)], compact=[("research use only", CAPTION_RGB)]))
    placed = _layout(blocks, keep, scale, margin)
    if placed is None:  # no room beside the lungs: the text goes below the image
        canvas, placed = _strip(rgb, blocks, scale, margin)
    else:
        canvas = rgb
    overlay = Overlay(canvas)
    for block, sized, box in placed:
        _draw(canvas, block, sized, box, margin)
        overlay.boxes[block.name] = box
    overlay.strip_rows = canvas.shape[0] - rows
    _orientation_markers(overlay, keep, patient_orientation, scale, thickness, margin)
    return overlay


def _strip(rgb: np.ndarray, blocks: list[_Block], scale: float, margin: int) -> tuple[np.ndarray, list[Placement]]:
    """The image unchanged with a black strip below it holding every block, stacked at full width.

    Used only when the lungs leave no room for the text inside the image (small images filled by lung):
    the SC then has more rows than the source, and the radiograph is still shown whole and untouched.
    """
    rows, columns = rgb.shape[:2]
    scale = max(scale, SMALL_IMAGE_MIN_SCALE)
    stacked = []
    y = rows
    for block in blocks:
        wide = _Block(block.name, block.lines, True, block.background, block.swatch, block.emphasis)
        sized = _size(wide, scale, columns, margin) or _size(wide, SMALL_IMAGE_MIN_SCALE, columns, margin)
        assert sized is not None  # full width at the smallest size: a word is cut into pieces if need be
        stacked.append((wide, sized, (0, y, columns, y + sized.height)))
        y += sized.height
    canvas = np.zeros((y, columns, 3), np.uint8)
    canvas[:rows] = rgb
    return canvas, stacked


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


def _opposite(direction: str) -> str:
    return "".join(_OPPOSITE.get(c, c) for c in direction)


def turned_orientation(patient_orientation: Sequence[str] | None, quarter_turns: int) -> list[str] | None:
    """PatientOrientation of the *stored* pixels when the gate found that ``np.rot90(stored, quarter_turns)``
    is upright and the header's orientation describes that upright image.

    The header of such a file describes an image the pixels are not: a receiving workstation would
    place R/L on the wrong edges. ``quarter_turns`` 0 returns the header's value unchanged.
    """
    if not patient_orientation or len(patient_orientation) < 2:
        return None
    row, column = str(patient_orientation[0]).upper(), str(patient_orientation[1]).upper()
    # edges of the upright image: right = row, left = opposite(row), bottom = column, top = opposite(column);
    # the stored image is the upright one turned back clockwise: each step, the top edge becomes the right edge
    # and the right edge the bottom: (row, column) -> (opposite(column), row)
    for _ in range(quarter_turns % 4):
        row, column = _opposite(column), row
    return [row, column]


def _orientation_markers(overlay: Overlay, keep: _KeepOut, patient_orientation: Sequence[str] | None, scale: float,
                         thickness: int, margin: int) -> None:
    image = overlay.rgb
    rows, columns = image.shape[:2]
    big, heavy = scale * 2.0, max(2, thickness * 2)
    for edge, letter in orientation_markers(patient_orientation).items():
        (w, h), base = cv2.getTextSize(letter, FONT, big, heavy)
        along = [0.5, 0.35, 0.65, 0.2, 0.8, 0.08, 0.92]  # positions along the edge, the middle first
        spots = []
        for f in along:
            if edge in ("left", "right"):
                x = margin if edge == "left" else columns - w - margin
                y = int(rows * f) - h // 2
            else:
                x = int(columns * f) - w // 2
                y = margin if edge == "top" else rows - h - base - margin
            spots.append((x, y, x + w, y + h + base))
        box = next((b for b in spots if keep.free(b)), None)
        if box is None:
            continue  # no room off the lungs and the text: a marker over the lung helps no one
        x0, _, _, y1 = box
        cv2.putText(image, letter, (x0, y1 - base), FONT, big, (0, 0, 0), heavy + 2, cv2.LINE_AA)
        cv2.putText(image, letter, (x0, y1 - base), FONT, big, MARKER_RGB, heavy, cv2.LINE_AA)
        keep.taken.append(box)
        overlay.boxes[f"marker:{edge}"] = box
