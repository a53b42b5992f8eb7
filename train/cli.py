"""``lungseg-train``: the two-stage transfer-learning pipeline and its report.

Only the parser lives here; the work is :mod:`lungseg.train.commands`, imported when a command runs
(it imports torch, 1.4-2.2 s), so ``--help`` takes ~0.06 s (~2.5 s with it at the top).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lungseg.train.config import PROTOCOLS


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path,
                   help="manifest CSV (columns as in the data README) or a samples cache .npz (lungseg-train cache)")
    p.add_argument("--out", type=Path, required=True, help="run folder (created, or resumed if it exists)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="paper",
                   help="named recipe: 'paper' (Vidal et al. 2021, the default) or 'product' (the shipped model's); "
                   "flags below override single settings")
    p.add_argument("--donor", default="scratch",
                   help="stage 0: 'hub', 'scratch' or a local weights file such as unet-e012d006.pt")
    p.add_argument("--repetitions", type=int, default=25, help="stage-1 repetitions (paper: 25)")
    p.add_argument("--stage2-repetitions", type=int, default=None, help="default: same as --repetitions")
    p.add_argument("--max-epochs", type=int, default=None, help="paper: 200 (early stopping decides)")
    p.add_argument("--stage2-max-epochs", type=int, default=None, help="default: same as --max-epochs")
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience (epochs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--stage2-lr", type=float, default=None, help="default: --lr (product: 3e-4)")
    p.add_argument("--stage2-freeze", choices=("none", "encoder"), default=None,
                   help="keep stage-1 weights of these layers in stage 2")
    p.add_argument("--loss", choices=("dice", "dice_bce"), default=None, help="paper: dice; product: dice_bce")
    p.add_argument("--intensity-probability", type=float, default=None,
                   help="probability of portable-image intensity augmentation (paper 0, product 0.8)")
    p.add_argument("--electrode-probability", type=float, default=None,
                   help="within the intensity augmentation, probability of ECG electrodes (discs with leads; "
                   "default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=2, help="threads for image preprocessing")
    p.add_argument("--loader-workers", type=int, default=0, help="data-loader processes (0: in the main process)")
    p.add_argument("--init-features", type=int, default=32, help="U-Net width (32 = the donor's)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="run repetitions one after another here, or as Ray tasks")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--ray-workers", type=int, default=None, help="CPUs of the local Ray instance")
    p.add_argument("--ray-retries", type=int, default=3,
                   help="times Ray retries a repetition whose worker died (it resumes from its last epoch)")
    p.add_argument("--ray-gpu-fraction", type=float, default=1.0,
                   help="share of a GPU each repetition asks Ray for (0.25: four repetitions per GPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungseg-train",
        description="Two-stage transfer learning (Vidal et al. 2021): donor -> stage 1 (common chest "
        "X-rays) -> stage 2 (portable) -> evaluation -> report. Rerun the same command to resume.",
        epilog="Exit codes: 0 ok, 1 training/evaluation failed, 2 usage error.",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "all steps: stage1, stage2, evaluate, report"),
        ("stage1", "train stage 1 only"),
        ("stage2", "train stage 2 only (needs stage 1)"),
        ("evaluate", "evaluate finished repetitions"),
    ):
        _add_training_flags(sub.add_parser(name, help=help_text))
    cache = sub.add_parser("cache", help="preprocess a manifest into one portable samples .npz")
    cache.add_argument("--data", type=Path, required=True, help="manifest CSV")
    cache.add_argument("--out", type=Path, required=True, help="output .npz")
    cache.add_argument("--image-size", type=int, default=256)
    cache.add_argument("--workers", type=int, default=2)
    cache.add_argument("--bits", type=int, choices=(8, 16), default=16,
                       help="image precision (8 halves the file and suits 8-bit source images)")
    hold = sub.add_parser("holdout", help="score a model through lungseg-segment on held-out images (native size)")
    hold.add_argument("--data", type=Path, required=True, help="manifest CSV")
    hold.add_argument("--model", type=Path, default=None, help="ONNX file or bundle (default: the shipped model)")
    hold.add_argument("--subset", choices=("independent", "portable"), default="independent")
    hold_out = hold.add_mutually_exclusive_group()
    hold_out.add_argument("--json", action="store_true",
                          help="the summary as JSON on stdout (the default; the switch every lungseg command takes)")
    hold_out.add_argument("--json-out", type=Path, default=None, metavar="PATH",
                          help="also write the per-image results to PATH (JSON)")
    hold.add_argument("--path", choices=("segment", "edge"), default="segment",
                      help="lungseg-segment on the images, or the images wrapped as DICOM through lungseg-edge --once")
    hold.add_argument("--segment-args", default="", help="extra lungseg-segment / lungseg-edge run arguments")
    best = sub.add_parser("best", help="print the best finished checkpoint (lowest validation loss)")
    best.add_argument("run_dir", type=Path)
    best.add_argument("--stage", default="stage2", choices=("stage1", "stage2"))
    report = sub.add_parser("report", help="Markdown + JSON + PNG report of an evaluated run")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/report")
    gate = sub.add_parser("gate", help="train the image gate (orientation, negative, mirror, chest), "
                          "score it on held-out patients and export gate.onnx + gate.json")
    gate.add_argument("--data", type=Path, required=True, help="manifest CSV")
    gate.add_argument("--out", type=Path, required=True, help="gate run folder (rendered samples are cached here)")
    gate.add_argument("--epochs", type=int, default=30)
    gate.add_argument("--batch-size", type=int, default=64)
    gate.add_argument("--lr", type=float, default=3e-3)
    gate.add_argument("--seed", type=int, default=0)
    gate.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    gate.add_argument("--no-bf16", action="store_true", help="train in fp32 (default: bf16 autocast on the CPU)")
    gate.add_argument("--shape-model", action="store_true",
                      help="also fit the mask shape model (shape_model.npz) on the training patients' masks")
    gate.add_argument("--model", type=Path, default=None,
                      help="segmenter bundle used to calibrate the shape model (default: the shipped one)")
    gate.add_argument("--mirror-folds", type=int, default=3, metavar="K",
                      help="choose the mirror threshold on out-of-fold scores of the training patients, K folds "
                      "(K more gates trained; 0: skip; default: %(default)s)")
    gate.add_argument("--mirror-budget", type=float, default=0.005, metavar="F",
                      help="at most this fraction of unaltered out-of-fold images flagged as mirrored "
                      "(default: %(default)s)")
    gate.add_argument("--calibrate-only", action="store_true",
                      help="only choose the mirror threshold for the gate already in --out (same settings)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lungseg.train import commands  # torch (~2 s): not for --help

    return commands.run(args, logging.getLogger("lungseg.train"))


if __name__ == "__main__":
    sys.exit(main())
