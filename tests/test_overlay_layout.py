"""The SC overlay keeps its text whole and off the lungs, at every size, and its markers follow the pixels."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT

from lungseg.edge_runtime.overlay import (
    OUTLINE_RGB,
    REVIEW_RGB,
    orientation_markers,
    render_overlay,
    turned_orientation,
)

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "cxr"
REVIEW = ["image looks mirrored left-right", "lung tops at very different heights"]
AREAS = ["right lung: 232.7 cm2", "left lung: 163.2 cm2", "total: 395.9 cm2", "QA: mirrored, lung_apex_mismatch"]


def _fixture_masks() -> list[tuple[str, np.ndarray, np.ndarray]]:
    with (FIXTURES / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        image = cv2.imread(str(FIXTURES / row["image"]), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(FIXTURES / row["mask"]), cv2.IMREAD_GRAYSCALE) == 255
        out.append((row["id"], image, mask))
    return out


def _at(image: np.ndarray, mask: np.ndarray, long_side: int) -> tuple[np.ndarray, np.ndarray]:
    scale = long_side / max(image.shape)
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return (cv2.resize(image, size, interpolation=cv2.INTER_AREA),
            cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool))


def _inside(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> bool:
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]


@pytest.mark.parametrize("long_side", [256, 1024, 2048])
def test_text_is_whole_and_off_the_lungs_on_real_masks(long_side: int) -> None:
    """Legend, banner and caption on the 20 fixture radiographs (adult and paediatric) scaled to 256/1024/2048 px."""
    overlaps: dict[str, int] = {}
    strips: dict[str, int] = {}
    for name, image, mask in _fixture_masks():
        image, mask = _at(image, mask, long_side)
        overlay = render_overlay(image, mask, legend=["model lungseg-unet 0.2.1 (cpu)"], areas=AREAS, review=REVIEW,
                                 notes=["image was rotated: turned 180 deg counter-clockwise before segmenting"],
                                 patient_orientation=["L", "F"])
        # the SC has the source's rows x columns, unless the lungs left no room: then a strip below the image
        assert overlay.rgb.shape == (image.shape[0] + overlay.strip_rows, image.shape[1], 3)
        strips[name] = overlay.strip_rows
        assert {"banner", "legend", "caption"} <= set(overlay.boxes)
        overlaps[name] = 0
        for box in overlay.boxes.values():
            assert _inside(box, overlay.rgb.shape), (name, box)
            x0, y0, x1, y1 = box
            overlaps[name] += int(mask[y0:y1, x0:x1].sum())
    assert overlaps == {name: 0 for name in overlaps}, "text over the lungs"
    # a strip below the image only where the lungs fill it: at 256 px nearly always (the text needs ~100 rows),
    # at 1,024 px one fixture of 20 (a paediatric film cropped to the chest), at 2,048 px none; the adult DICOMs
    # below never need one
    if long_side >= 1024:
        assert sum(1 for rows in strips.values() if rows) <= {1024: 1, 2048: 0}[long_side]


def test_banner_spans_the_width_and_says_review() -> None:
    _, image, mask = _fixture_masks()[0]
    image, mask = _at(image, mask, 1024)
    overlay = render_overlay(image, mask, review=REVIEW)
    x0, y0, x1, y1 = overlay.boxes["banner"]
    assert (x0, x1) == (0, image.shape[1])
    assert np.all(overlay.rgb[(y0 + y1) // 2, :5] == REVIEW_RGB)


def test_outline_style_leaves_the_lung_pixels_alone_and_filled_outline_tints_them() -> None:
    _, image, mask = _fixture_masks()[3]
    image, mask = _at(image, mask, 1024)
    inner = cv2.erode(mask.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    outline = render_overlay(image, mask)
    filled = render_overlay(image, mask, style="filled-outline")
    gray = np.repeat(image[..., None], 3, axis=2)
    assert np.array_equal(outline.rgb[inner], gray[inner])  # the radiograph shows through untouched
    assert not np.array_equal(filled.rgb[inner], gray[inner])
    edge = mask & ~inner
    assert (outline.rgb[edge] == OUTLINE_RGB).all(axis=1).any()
    with pytest.raises(ValueError, match="style"):
        render_overlay(image, mask, style="heatmap")


@pytest.mark.parametrize(("turns", "expected"), [
    (0, ["L", "F"]),  # as the header says
    (1, ["H", "L"]),  # stored turned a quarter clockwise: the head on the right
    (2, ["R", "H"]),  # stored upside down: R on the right, the head at the bottom
    (3, ["F", "R"]),
])
def test_markers_follow_the_pixels_after_a_gate_correction(turns: int, expected: list[str]) -> None:
    assert turned_orientation(["L", "F"], turns) == expected
    # turning the stored image by the gate's correction brings back the header's markers
    upright = orientation_markers(["L", "F"])
    stored = orientation_markers(turned_orientation(["L", "F"], turns))
    edges = ["top", "right", "bottom", "left"]  # clockwise
    assert {edges[(edges.index(e) + turns) % 4]: v for e, v in upright.items()} == stored


def test_shared_dicom_scs_are_native_size_with_text_off_the_lungs(tmp_path: Path) -> None:
    """The six real DICOMs through the edge: every SC has the source's Rows x Columns, no text over the lungs."""
    import json
    import subprocess
    import sys

    import pydicom
    from edge_helpers import shared_dicom_dir

    source = shared_dicom_dir()
    watch = tmp_path / "in"
    watch.mkdir()
    for f in source.glob("*.dcm"):
        (watch / f.name).write_bytes(f.read_bytes())
    cmd = [sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--once", "--watch", str(watch), "--out",
           str(tmp_path / "out"), "--state", str(tmp_path / "state"), "--backend", "cpu", "--seg"]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    scs = sorted((tmp_path / "out").rglob("*.sc.dcm"))
    assert len(scs) == 6
    for sc_path in scs:
        sc = pydicom.dcmread(sc_path)
        sidecar = json.loads(sc_path.with_name(sc_path.name.replace(".sc.dcm", ".json")).read_text())
        assert (sc.Rows, sc.Columns) == (sidecar["source"]["rows"], sidecar["source"]["columns"])
        assert sidecar["rendered"]["text_strip_rows"] == 0
        seg = pydicom.dcmread(sc_path.with_name(sc_path.name.replace(".sc.dcm", ".seg.dcm")))
        lung = np.asarray(seg.pixel_array).astype(bool).reshape(sc.Rows, sc.Columns)
        boxes = sidecar["rendered"]["text_boxes"]
        assert {"legend", "caption"} <= set(boxes)
        for name, (x0, y0, x1, y1) in boxes.items():
            assert int(lung[y0:y1, x0:x1].sum()) == 0, (sc_path.name, name)
