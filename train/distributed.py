"""Running a stage's repetitions: one after another here, or as Ray tasks on many machines.

Repetitions are independent, so each one is a Ray task that reopens the run folder and
calls :func:`lungseg.train.pipeline.train_repetition`, the same code the local executor
runs. Every task writes its own checkpoint, ``log.jsonl`` and ``done.json`` in its
``stageN/repMM`` folder, and resumes from ``last.pt``: a task whose worker dies is retried
by Ray (``max_retries``) and picks up at its last finished epoch, and re-running the
command skips finished repetitions. The run folder must be on storage every worker sees
(a shared file system on a cluster; the local disk for ``ray.init()`` on one machine).
Merging is the ordinary ``lungseg-train evaluate`` + ``report`` step.

A local instance (no ``--ray-address``) keeps every Ray process on the loopback address:
Ray's control ports (GCS, raylet, workers, agents) must not listen on the network for a run
on one machine. A cluster is whatever ``--ray-address`` names; securing it is the cluster's
business (a private network, Ray's token authentication or TLS: see the README).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from lungseg.train.loop import DONE
from lungseg.train.pipeline import Run, train_repetition

log = logging.getLogger(__name__)

WORKER_PID = "worker.pid"

LOOPBACK = "127.0.0.1"
# Ray on Linux rewrites a loopback node address to the machine's network address (its
# multi-node default) unless this is off; it is read when ray is imported, and Ray's own
# processes inherit it. With the node address 127.0.0.1 Ray's gRPC servers listen on loopback.
_RAY_MULTI_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _train_one(run_dir: str, stage: str, rep: int, threads: int) -> dict:
    """Body of one Ray task (runs in a Ray worker process)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, threads))
    run = Run.open(Path(run_dir))
    rep_dir = run.rep_dir(stage, rep)
    rep_dir.mkdir(parents=True, exist_ok=True)
    (rep_dir / WORKER_PID).write_text(f"{os.getpid()}\n")
    train_repetition(run, stage, rep)
    return {"stage": stage, "rep": rep, "done": (rep_dir / DONE).is_file()}


def run_stage_on_ray(run: Run, stage: str, address: str | None = None, workers: int | None = None,
                     max_retries: int = 3, gpu_fraction: float = 1.0) -> list[dict]:
    """Train all repetitions of ``stage`` as Ray tasks; returns one summary per repetition.

    ``address`` None starts a local Ray instance (``workers`` CPUs, default all); otherwise it
    connects to a running cluster (``"auto"`` or ``"ray://host:10001"``). On a CUDA run each
    task asks Ray for ``gpu_fraction`` of a GPU (0.25 packs four repetitions on one GPU).
    """
    if not address:
        os.environ[_RAY_MULTI_NODE_ENV] = "0"  # before `import ray`, which reads it
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--executor ray needs Ray: pip install 'lungseg[cluster]'") from exc

    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
        else:
            _init_local_ray(ray, workers or os.cpu_count())
    try:
        gpu = gpu_fraction if run.config.device.startswith("cuda") else 0
        threads = max(1, (os.cpu_count() or 1) // max(1, workers or 1))
        task = ray.remote(num_cpus=1, num_gpus=gpu, max_retries=max_retries)(_train_one)
        pending = [task.remote(str(run.dir.resolve()), stage, rep, threads) for rep in range(run.n_reps(stage))]
        log.info("%s: %d repetitions submitted to Ray", stage, len(pending))
        results = ray.get(pending)
    finally:
        if started:
            ray.shutdown()
    for result in results:
        log.info("%s rep %d finished on Ray", result["stage"], result["rep"])
    return results


def _init_local_ray(ray, num_cpus: int | None) -> None:
    """Start a new local Ray instance whose processes all listen on loopback only.

    ``address="local"`` always starts a new instance (never joins a cluster found through
    ``RAY_ADDRESS`` or a running ``ray start``). Fails closed: if Ray still took a network
    address for the node, it is shut down and the run refused.
    """
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if getattr(constants, "ENABLE_RAY_CLUSTER", False):  # ray was imported before the variable was set
        constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, include_dashboard=False,
             dashboard_host=LOOPBACK, log_to_driver=True, configure_logging=False)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"local Ray took the node address {node_ip}, not {LOOPBACK}: refusing to expose its "
                           "ports on the network (see the README on clusters for a loopback-only instance)")
    log.info("local Ray instance on %s (%s CPUs)", LOOPBACK, num_cpus)


def run_stage(run: Run, stage: str, executor: str = "local", ray_address: str | None = None,
              ray_workers: int | None = None, ray_retries: int = 3, ray_gpu_fraction: float = 1.0) -> None:
    """Train every repetition of ``stage`` (skips completed ones, resumes a stopped one).

    ``executor="ray"`` runs the repetitions as independent Ray tasks (see :mod:`lungseg.train.distributed`).
    """
    if executor == "ray":
        run_stage_on_ray(run, stage, ray_address, ray_workers, ray_retries, ray_gpu_fraction)
        return
    for rep in range(run.n_reps(stage)):
        train_repetition(run, stage, rep)
