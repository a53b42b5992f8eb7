"""``lungseg-train report``: the paper's Tables 1-4, loss curves, per-class plots and overlays."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lungseg.metrics import METRIC_NAMES
from lungseg.train import paper
from lungseg.train.error_analysis import error_analysis, render

log = logging.getLogger(__name__)
STAGES = ("stage1", "stage2")


def _fmt(cell: dict[str, float] | None, std: bool = True) -> str:
    if not cell:
        return "–"
    return f"{cell['mean']:.4f} ± {cell['std']:.4f}" if std else f"{cell['mean']:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _read_logs(run_dir: Path, stage: str) -> list[list[dict[str, Any]]]:
    logs = []
    for path in sorted((run_dir / stage).glob("rep*/log.jsonl")):
        logs.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    return logs


def plot_losses(run_dir: Path, out: Path) -> Path:
    """Training and validation loss per epoch, mean ± std over repetitions, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, stage in zip(axes, STAGES, strict=True):
        logs = _read_logs(run_dir, stage)
        for key, color in (("train_loss", "tab:blue"), ("val_loss", "tab:orange")):
            if not logs:
                continue
            longest = max(len(x) for x in logs)
            values = np.full((len(logs), longest), np.nan)
            for i, entries in enumerate(logs):
                values[i, : len(entries)] = [e[key] for e in entries]
            mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            epochs = np.arange(1, longest + 1)
            ax.plot(epochs, mean, color=color, label=key.replace("_", " "))
            ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)
        ax.set_title(f"{stage} ({len(logs)} repetition(s))")
        ax.set_xlabel("epoch")
        ax.set_ylabel("smooth Dice loss")
        ax.legend()
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_class(summary: dict[str, Any], out: Path) -> Path:
    """Per-class metric means on the independent half, stage-1 vs stage-2 model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t3, t4 = summary["table3_stage1_independent_by_class"], summary["table4_stage2_independent_by_class"]
    classes = sorted(set(t3) | set(t4))
    fig, axes = plt.subplots(1, max(1, len(classes)), figsize=(5 * max(1, len(classes)), 4), squeeze=False)
    metrics = list(paper.TABLE34_METRICS)
    x = np.arange(len(metrics))
    for ax, cls in zip(axes[0], classes, strict=False):
        for offset, (table, label, color) in enumerate(((t3, "stage 1", "tab:red"), (t4, "stage 2", "tab:blue"))):
            cell = table.get(cls, {})
            means = [cell.get(m, {}).get("mean", np.nan) for m in metrics]
            stds = [cell.get(m, {}).get("std", 0.0) for m in metrics]
            ax.bar(x + (offset - 0.5) * 0.38, means, 0.38, yerr=stds, label=label, color=color, alpha=0.8)
        n = t4.get(cls, {}).get("DICE", {}).get("n", 0)
        ax.set_title(f"{cls} (n = {n} image-evaluations)")
        ax.set_xticks(x, metrics)
        ax.set_ylim(0.5, 1.0)
        ax.legend(loc="lower right")
    fig.tight_layout()
    path = out / "per_class_stage1_vs_stage2.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overlays(predictions: Path, out: Path, count: int = 4, threshold: float = 0.5) -> Path | None:
    """A few independent portable radiographs with stage-1 (red) and stage-2 (blue) outlines."""
    if not predictions.is_file():
        return None
    data = np.load(predictions)
    if "stage1_probability" not in data or "stage2_probability" not in data:
        return None
    s1, s2 = data["stage1_probability"].astype(np.float32), data["stage2_probability"].astype(np.float32)
    # show the images where the two models disagree most: that is where stage 2 matters
    disagreement = ((s1 >= threshold) != (s2 >= threshold)).mean(axis=(1, 2))
    picks = np.argsort(disagreement)[::-1][:count]
    tiles = []
    for i in picks:
        image = data["images"][i].astype(np.float32)
        gray = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        tile = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        tile = cv2.resize(tile, (512, 512), interpolation=cv2.INTER_LINEAR)
        for prob, color in ((s1[i], (0, 0, 255)), (s2[i], (255, 128, 0))):
            mask = cv2.resize((prob >= threshold).astype(np.uint8), (512, 512), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(tile, contours, -1, color, 2)
        label = f"{data['classes'][i]}  red: stage 1  blue: stage 2"
        cv2.putText(tile, label, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    path = out / "overlays_stage1_red_stage2_blue.png"
    cv2.imwrite(str(path), np.hstack(tiles))
    return path


def render_candidates(candidates: dict[str, Any]) -> list[str]:
    """The recipes tried and the validation Dice each reached (``candidates.json`` in the run folder)."""
    md = ["## Candidates (chosen by stage-2 validation Dice, never by test data)", "",
          candidates.get("note", ""), "",
          "| candidate | what differs | stage-1 val Dice | stage-2 val Dice | epochs (stage 1 / stage 2) | kept |",
          "|---|---|---|---|---|---|"]
    for name, row in candidates["candidates"].items():
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "–"  # noqa: E731
        md.append(f"| {name} | {row.get('what', '')} | {fmt(row.get('stage1_val_dice'))} |"
                  f" {fmt(row.get('stage2_val_dice'))} | {row.get('stage1_epochs')} / {row.get('stage2_epochs')} |"
                  f" {'**yes**' if name == candidates.get('chosen') else ''} |")
    return [*md, ""]


def render_markdown(run_dir: Path, summary: dict[str, Any], figures: dict[str, Path | None],
                    analysis: dict[str, Any] | None = None) -> str:
    config = json.loads((run_dir / "config.json").read_text())
    plan = json.loads((run_dir / "data_plan.json").read_text())
    reps = summary["repetitions"]
    md = [f"# Training report: `{run_dir.name}`", ""]
    md += ["## Protocol actually run", "",
           f"- donor: `{config['donor']}`; repetitions: stage 1 = {reps['stage1']}, stage 2 = {reps['stage2']}",
           f"- max epochs: {config['max_epochs']} (stage 2: {config.get('stage2_max_epochs') or config['max_epochs']}),"
           f" early-stopping patience {config['patience']}, batch {config['batch_size']}, image {config['image_size']},"
           f" Adam lr {config['lr']}, plateau factor {config['plateau_factor']}"
           f" / patience {config['plateau_patience']}",
           f"- protocol `{config.get('protocol', 'paper')}`: loss `{config.get('loss', 'dice')}` (smooth λ ="
           f" {config['smooth']}); rotation ±{config['rotation_degrees']}° with p = {config['rotation_probability']}"
           f" ({config.get('geometry', 'sample')}), scale ±{config.get('scale_range', 0)},"
           f" shift ±{config.get('translate_fraction', 0)}, intensity p = {config.get('intensity_probability', 0)};"
           f" stage-2 lr {config.get('stage2_lr') or config['lr']}, frozen: {config.get('stage2_freeze', 'none')};"
           f" splits {config['split_fractions']} by patient; seed {config['seed']}",
           f"- data plan: {json.dumps(plan)}",
           "- Metrics are computed per image in model space (256 × 256), 'ignore' pixels excluded, threshold"
           f" {config['threshold']}, no postprocessing (as in the paper); mean ± std over all image-evaluations"
           " of all repetitions.", ""]

    def nine(title: str, ours: dict[str, Any], theirs: dict[str, dict[str, float]]) -> list[str]:
        rows = [["lungseg"] + [_fmt(ours.get(m)) for m in METRIC_NAMES],
                ["paper"] + [f"{theirs['mean'][m]:.4f} ± {theirs['std'][m]:.4f}" for m in METRIC_NAMES]]
        n = ours.get("DICE", {}).get("n", 0)
        return [f"## {title} (n = {n})", "", _table(["", *METRIC_NAMES], rows), ""]

    md += nine("Table 1 — stage-1 model, stage-1 test split", summary["table1_stage1_test"], paper.TABLE1_STAGE1)
    md += nine("Table 2 — stage-2 model, stage-2 test split", summary["table2_stage2_test"], paper.TABLE2_STAGE2)
    md += ["## Tables 3 and 4 — independent portable half, by class (mean ± std; paper's mean in brackets)", ""]
    rows = []
    t3, t4 = summary["table3_stage1_independent_by_class"], summary["table4_stage2_independent_by_class"]
    for cls in sorted(set(t3) | set(t4)):
        for stage, table in (("stage 1", t3), ("stage 2", t4)):
            cell = table.get(cls, {})
            ref = paper.TABLE34_BY_CLASS.get(cls, {}).get(stage.replace(" ", ""), {})
            n = cell.get("DICE", {}).get("n", 0)
            rows.append([cls, stage, str(n)] + [
                f"{_fmt(cell.get(m))} ({ref[m]:.4f})" if m in ref else _fmt(cell.get(m))
                for m in paper.TABLE34_METRICS])
    md += [_table(["class", "model", "n", *paper.TABLE34_METRICS], rows), ""]
    overall = summary["independent_overall"]
    md += ["### All independent images", "",
           _table(["model", *METRIC_NAMES],
                  [[s] + [_fmt(overall[s].get(m)) for m in METRIC_NAMES] for s in STAGES]), ""]
    art = summary["artefacts_independent"]
    md += ["## Artefacts on the independent half (not exactly two lung components)", "",
           _table(["model", "image-evaluations", "before postprocessing", "after postprocessing"],
                  [[s, str(art[s]["images"]), str(art[s]["raw"]), str(art[s]["postprocessed"])] for s in STAGES]),
           ""]
    candidates = run_dir / "candidates.json"
    if candidates.is_file():
        md += render_candidates(json.loads(candidates.read_text()))
    if analysis:
        md += render(analysis)
    for title, key in (("Loss curves", "loss"), ("Per-class comparison", "per_class"),
                       ("Overlays (stage 1 red, stage 2 blue)", "overlays")):
        if figures.get(key):
            md += [f"## {title}", "", f"![{title}]({figures[key].name})", ""]
    return "\n".join(md)


def _portable_config(run_dir: Path) -> dict[str, Any]:
    """The run's config with the manifest named by its last two path parts (no machine paths)."""
    config = json.loads((run_dir / "config.json").read_text())
    config["manifest"] = "/".join(Path(config.get("manifest", "")).parts[-2:])
    return config


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``report.md``, ``report.json`` and figures; returns the Markdown path."""
    metrics_path = run_dir / "evaluation" / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: run 'lungseg-train evaluate' first")
    out = out or run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = json.loads(metrics_path.read_text())
    figures = {
        "loss": plot_losses(run_dir, out),
        "per_class": plot_per_class(summary, out),
        "overlays": plot_overlays(run_dir / "evaluation" / "independent_predictions.npz", out),
    }
    analysis = error_analysis(run_dir / "evaluation" / "independent_predictions.npz", out)
    (out / "report.json").write_text(json.dumps({
        "ours": summary,
        "paper": {"table1": paper.TABLE1_STAGE1, "table2": paper.TABLE2_STAGE2,
                  "table3_4_by_class": paper.TABLE34_BY_CLASS},
        "config": _portable_config(run_dir),
        "data_plan": json.loads((run_dir / "data_plan.json").read_text()),
        "epochs": {s: [len(x) for x in _read_logs(run_dir, s)] for s in STAGES},
        "error_analysis": analysis,
    }, indent=2) + "\n")
    path = out / "report.md"
    path.write_text(render_markdown(run_dir, summary, figures, analysis))
    return path
