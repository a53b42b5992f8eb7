"""The work of ``lungseg-train`` (:mod:`lungseg.train.cli` parses, then calls :func:`run`).

Imported only once a command runs: it brings torch (1.4-2.2 s), so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from lungseg.data import load_manifest
from lungseg.train.cache import write_cache
from lungseg.train.config import PROTOCOLS, TrainConfig
from lungseg.train.distributed import run_stage
from lungseg.train.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from lungseg.train.gate_calibrate import calibrate
from lungseg.train.gate_train import GateTrainConfig, train
from lungseg.train.holdout import main_holdout
from lungseg.train.pipeline import Run, best_checkpoint, run_evaluation
from lungseg.train.report import write_report
from lungseg.train.shape_fit import fit_and_save


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = dict(PROTOCOLS[args.protocol])
    explicit = {
        "loss": args.loss, "intensity_probability": args.intensity_probability, "stage2_lr": args.stage2_lr,
        "stage2_freeze": args.stage2_freeze, "max_epochs": args.max_epochs,
        "electrode_probability": args.electrode_probability,
        "stage2_max_epochs": args.stage2_max_epochs,
    }
    values.update({k: v for k, v in explicit.items() if v is not None})
    return TrainConfig(
        manifest=str(args.data.resolve()), donor=args.donor, repetitions=args.repetitions,
        stage2_repetitions=args.stage2_repetitions, patience=args.patience, batch_size=args.batch_size,
        image_size=args.image_size, lr=args.lr, seed=args.seed, device=args.device, workers=args.workers,
        init_features=args.init_features, protocol=args.protocol, loader_workers=args.loader_workers,
        **values,
    )


def run(args: argparse.Namespace, log: logging.Logger) -> int:
    """Run the parsed command (``lungseg-train``'s exit code)."""
    if args.command == "gate":
        return _gate(args, log)
    if args.command == "best":
        try:
            print(best_checkpoint(args.run_dir, args.stage))
        except FileNotFoundError as exc:
            log.error("%s", exc)
            return EXIT_USAGE
        return EXIT_OK
    if args.command == "cache":
        if not args.data.is_file():
            log.error("%s: manifest not found", args.data)
            return EXIT_USAGE
        path = write_cache(load_manifest(args.data), args.out, args.image_size, args.workers, args.bits)
        log.info("samples cache: %s (%.1f MB)", path, path.stat().st_size / 1e6)
        return EXIT_OK
    if args.command == "holdout":
        result = main_holdout(args.model, args.data, args.subset, args.json_out, args.segment_args.split(),
                              args.path)
        summary = {k: v for k, v in result.items() if k != "rows"}
        print(json.dumps(summary))
        return EXIT_OK if result["scored"] == result["images"] else EXIT_FAILED
    if args.command == "report":
        try:
            path = write_report(args.run_dir, args.out)
        except FileNotFoundError as exc:
            log.error("%s", exc)
            return EXIT_USAGE
        log.info("report: %s", path)
        return EXIT_OK

    config = None
    if args.data is not None:
        if not args.data.is_file():
            log.error("%s: manifest not found", args.data)
            return EXIT_USAGE
        config = _config_from_args(args)
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
                run_stage(run, step, args.executor, args.ray_address, args.ray_workers, args.ray_retries,
                          args.ray_gpu_fraction)
            elif step == "evaluate":
                run_evaluation(run)
            else:
                write_report(run.dir)
    except Exception as exc:
        log.exception("training failed: %s", exc)
        return EXIT_FAILED
    log.info("done in %.1f min: %s", (time.perf_counter() - t0) / 60, run.dir)
    return EXIT_OK


def _gate(args: argparse.Namespace, log: logging.Logger) -> int:
    if not args.data.is_file():
        log.error("%s: manifest not found", args.data)
        return EXIT_USAGE
    config = GateTrainConfig(manifest=str(args.data.resolve()), epochs=args.epochs, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed, threads=args.threads, bf16=not args.no_bf16)
    if args.calibrate_only and not (args.out / "gate.json").is_file():
        log.error("%s: no gate run to calibrate (gate.json missing)", args.out)
        return EXIT_USAGE
    try:
        if not args.calibrate_only:
            manifest = train(args.out, config)
            log.info("gate held-out accuracy: %s", manifest["heldout_accuracy"])
            if not manifest["parity"]["passed"]:
                return EXIT_FAILED
        if args.mirror_folds > 1:
            calibrate(args.out, config, folds=args.mirror_folds, budget=args.mirror_budget)
        if args.shape_model:
            fit_and_save(args.data.resolve(), args.out, args.model)
    except Exception as exc:
        log.exception("gate training failed: %s", exc)
        return EXIT_FAILED
    return EXIT_OK
