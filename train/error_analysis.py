"""Where the stage-2 model's errors are on the independent half: by image and by lung region.

Each error pixel (false negative: lung the model missed; false positive: lung it invented)
is assigned to a region defined by the reference mask of that image:

- ``apex``: the top 20% of the lungs' height (and anything above it);
- ``base``: the bottom 20% (costophrenic angles, diaphragm; and anything below it);
- ``medial``: the lower 60% between the two lungs' inner edges widened by 10% of the lung
  width each side (heart border, the retrocardiac lung);
- ``lateral``: everything else (chest wall, hilum, mid lung).

Region shares are geometry only: they say *where* the model fails, not *why* (an effusion,
a device or a consolidation at the base all count as ``base``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lungseg.metrics import dice

REGIONS = ("apex", "base", "medial", "lateral")


def region_map(truth: np.ndarray) -> np.ndarray | None:
    """An int map (index into :data:`REGIONS`) over the image, or None when there is no lung."""
    rows, cols = np.nonzero(truth)
    if rows.size == 0:
        return None
    top, bottom = rows.min(), rows.max()
    height = max(1, bottom - top)
    left_cols, right_cols = cols[cols < cols.mean()], cols[cols >= cols.mean()]
    inner_left = left_cols.max() if left_cols.size else cols.mean()
    inner_right = right_cols.min() if right_cols.size else cols.mean()
    margin = 0.1 * (cols.max() - cols.min())
    yy, xx = np.mgrid[: truth.shape[0], : truth.shape[1]]
    out = np.full(truth.shape, REGIONS.index("lateral"), np.uint8)
    medial = (yy >= top + 0.4 * height) & (xx >= inner_left - margin) & (xx <= inner_right + margin)
    out[medial] = REGIONS.index("medial")
    out[yy <= top + 0.2 * height] = REGIONS.index("apex")
    out[yy >= bottom - 0.2 * height] = REGIONS.index("base")
    return out


def analyse(truth: np.ndarray, probability: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Dice and error pixels by kind and region for one image (model space)."""
    truth = truth.astype(bool)
    pred = probability >= threshold
    regions = region_map(truth)
    result: dict[str, Any] = {"dice": dice(pred, truth), "fn": int((truth & ~pred).sum()),
                              "fp": int((pred & ~truth).sum())}
    if regions is None:
        return result
    for kind, errors in (("fn", truth & ~pred), ("fp", pred & ~truth)):
        counts = np.bincount(regions[errors], minlength=len(REGIONS))
        result[f"{kind}_by_region"] = {r: int(c) for r, c in zip(REGIONS, counts, strict=True)}
    both = {r: result["fn_by_region"][r] + result["fp_by_region"][r] for r in REGIONS}
    result["main_region"] = max(both, key=both.get)
    result["main_kind"] = "missed lung (FN)" if result["fn"] >= result["fp"] else "extra lung (FP)"
    return result


def error_analysis(predictions: Path, out: Path, key: str = "stage2_probability", worst: int = 10,
                   threshold: float = 0.5) -> dict[str, Any] | None:
    """Analyse every image of ``independent_predictions.npz``; write the worst-``worst`` overlay PNG."""
    if not predictions.is_file():
        return None
    data = np.load(predictions)
    if key not in data:
        return None
    probs, truths = data[key].astype(np.float32), data["truth"].astype(bool)
    rows = [{"id": str(i), "class": str(c), **analyse(t, p, threshold)}
            for i, c, t, p in zip(data["ids"], data["classes"], truths, probs, strict=True)]
    totals = {kind: {r: sum(row.get(f"{kind}_by_region", {}).get(r, 0) for row in rows) for r in REGIONS}
              for kind in ("fn", "fp")}
    all_errors = sum(sum(v.values()) for v in totals.values()) or 1
    order = sorted(range(len(rows)), key=lambda i: rows[i]["dice"])[:worst]
    tiles = []
    for i in order:
        gray = cv2.normalize(data["images"][i].astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        tile = cv2.resize(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), (320, 320), interpolation=cv2.INTER_LINEAR)
        for mask, color in ((truths[i], (0, 200, 0)), (probs[i] >= threshold, (0, 0, 255))):
            scaled = cv2.resize(mask.astype(np.uint8), (320, 320), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(scaled, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(tile, contours, -1, color, 2)
        label = f"Dice {rows[i]['dice']:.3f} {rows[i].get('main_region', '')}"
        cv2.putText(tile, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    figure = None
    if tiles:
        while len(tiles) % 5:
            tiles.append(np.zeros_like(tiles[0]))
        figure = out / "worst10_truth_green_model_red.png"
        cv2.imwrite(str(figure), np.vstack([np.hstack(tiles[j:j + 5]) for j in range(0, len(tiles), 5)]))
    return {
        "images": len(rows), "threshold": threshold,
        "error_share_by_region": {r: (totals["fn"][r] + totals["fp"][r]) / all_errors for r in REGIONS},
        "fn_share": sum(totals["fn"].values()) / all_errors,
        "worst": [rows[i] for i in order],
        "figure": figure.name if figure else None,
    }


def render(analysis: dict[str, Any]) -> list[str]:
    """Markdown lines for the training report."""
    share = analysis["error_share_by_region"]
    md = [f"## Where the errors are (stage 2, independent half, {analysis['images']} images)", "",
          "Share of all error pixels by region (definitions in `lungseg.train.error_analysis`): "
          + ", ".join(f"{r} {share[r]:.0%}" for r in REGIONS)
          + f"; {analysis['fn_share']:.0%} of error pixels are missed lung (FN), the rest extra lung (FP).", "",
          "| image | class | Dice | main region | main error | FN px | FP px |", "|---|---|---|---|---|---|---|"]
    for row in analysis["worst"]:
        md.append(f"| {row['id']} | {row['class']} | {row['dice']:.4f} | {row.get('main_region', '–')} |"
                  f" {row.get('main_kind', '–')} | {row['fn']} | {row['fp']} |")
    if analysis.get("figure"):
        md += ["", f"![worst images: reference green, model red]({analysis['figure']})"]
    return [*md, ""]
