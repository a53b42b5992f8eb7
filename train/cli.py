"""``lungseg-train``: the two-stage transfer-learning pipeline and its report."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="manifest CSV (columns as in the data README)")
    p.add_argument("--out", type=Path, required=True, help="run folder (created, or resumed if it exists)")
    p.add_argument("--donor", default="scratch",
                   help="stage 0: 'hub', 'scratch' or a local weights file such as unet-e012d006.pt")
    p.add_argument("--repetitions", type=int, default=25, help="stage-1 repetitions (paper: 25)")
    p.add_argument("--stage2-repetitions", type=int, default=None, help="default: same as --repetitions")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--stage2-max-epochs", type=int, default=None, help="default: same as --max-epochs")
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience (epochs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=2, help="threads for image preprocessing")
    p.add_argument("--init-features", type=int, default=32, help="U-Net width (32 = the donor's)")


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
    best = sub.add_parser("best", help="print the best finished checkpoint (lowest validation loss)")
    best.add_argument("run_dir", type=Path)
    best.add_argument("--stage", default="stage2", choices=("stage1", "stage2"))
    report = sub.add_parser("report", help="Markdown + JSON + PNG report of an evaluated run")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("lungseg.train")
    if args.command == "best":
        from lungseg.train.pipeline import best_checkpoint

        try:
            print(best_checkpoint(args.run_dir, args.stage))
        except FileNotFoundError as exc:
            log.error("%s", exc)
            return EXIT_USAGE
        return EXIT_OK
    if args.command == "report":
        from lungseg.train.report import write_report

        try:
            path = write_report(args.run_dir, args.out)
        except FileNotFoundError as exc:
            log.error("%s", exc)
            return EXIT_USAGE
        log.info("report: %s", path)
        return EXIT_OK

    from lungseg.train.config import TrainConfig
    from lungseg.train.pipeline import Run, run_evaluation, run_stage

    config = None
    if args.data is not None:
        if not args.data.is_file():
            log.error("%s: manifest not found", args.data)
            return EXIT_USAGE
        config = TrainConfig(
            manifest=str(args.data.resolve()), donor=args.donor, repetitions=args.repetitions,
            stage2_repetitions=args.stage2_repetitions, max_epochs=args.max_epochs,
            stage2_max_epochs=args.stage2_max_epochs,
            patience=args.patience, batch_size=args.batch_size, image_size=args.image_size,
            lr=args.lr, seed=args.seed, device=args.device, workers=args.workers,
            init_features=args.init_features,
        )
    try:
        run = Run.open(args.out, config)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    t0 = time.perf_counter()
    steps = {"run": ("stage1", "stage2", "evaluate", "report")}.get(args.command, (args.command,))
    try:
        for step in steps:
            if step in ("stage1", "stage2"):
                run_stage(run, step)
            elif step == "evaluate":
                run_evaluation(run)
            else:
                from lungseg.train.report import write_report

                write_report(run.dir)
    except Exception as exc:
        log.exception("training failed: %s", exc)
        return EXIT_FAILED
    log.info("done in %.1f min: %s", (time.perf_counter() - t0) / 60, run.dir)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
