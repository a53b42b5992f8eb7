"""The serving backend's state, for operators: ``<state>/backend.json`` and the metrics hook.

Written at start-up (after the self-test) and after every demotion; read by
``lungseg-edge status``. The service metrics (:mod:`~lungseg.edge_runtime.service_metrics`)
are told the backend, precision and self-test result, and count each demotion.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lungseg.atomic import atomic_write
from lungseg.edge_runtime import service_metrics

from .sdnotify import extend_start_timeout

log = logging.getLogger("lungseg.edge")

BACKEND_STATUS = "backend.json"


def write_backend_status(state_dir: Path, status: dict[str, Any]) -> None:
    """Replace ``<state>/backend.json`` atomically; a failure is logged, never raised."""
    path = Path(state_dir) / BACKEND_STATUS
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(status, indent=2, default=str) + "\n")
    except OSError as exc:
        log.warning("could not write %s: %s", path.name, exc)


def read_backend_status(state_dir: Path) -> dict[str, Any] | None:
    """The last status the daemon wrote, or ``None`` when there is none (or it is unreadable)."""
    try:
        value = json.loads((Path(state_dir) / BACKEND_STATUS).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def report_backend_to_metrics(status: dict[str, Any]) -> bool:
    """Hand the backend to :func:`service_metrics.set_backend` and count the last demotion; ``False`` when
    that failed (logged, never raised)."""
    selftest = status.get("selftest") or {}
    try:
        service_metrics.set_backend(str(status.get("backend")), str(status.get("precision")), selftest.get("passed"))
        if status.get("demotions"):
            last = status["demotions"][-1]
            service_metrics.count("backend_demotions", backend=str(last.get("from")), to=str(last.get("to")))
            service_metrics.backend_demoted(f"{last.get('from')} -> {last.get('to')}")
    except Exception as exc:  # metrics must never take the service down
        log.warning("metrics set_backend failed: %s", exc)
        return False
    return True


def describe(status: dict[str, Any]) -> list[str]:
    """Human-readable lines for ``lungseg-edge status``."""
    selftest = status.get("selftest") or {}
    device = f" on {status['device']}" if status.get("device") not in (None, "", "CPU", "none") else ""
    lines = [f"backend:                {status.get('backend')} ({status.get('precision')}{device}, "
             f"{status.get('model_file')})"]
    choice = status.get("choice") or {}
    if choice.get("reason"):
        lines.append(f"chosen by:              {choice.get('by')}: {choice['reason']}")
    if selftest.get("dice_mean") is not None:
        lines.append(f"self-test:              {'passed' if selftest.get('passed') else 'FAILED'}, mean Dice "
                     f"{selftest['dice_mean']:.4f}, min {selftest['dice_min']:.4f} on {selftest.get('n_images')} "
                     f"images ({selftest.get('seconds', 0):.2f} s)")
    else:
        lines.append(f"self-test:              {selftest.get('reason') or 'not run'}")
    for reason in status.get("fallbacks", []):
        lines.append(f"  not used: {reason}")
    demotions = status.get("demotions", [])
    lines.append(f"demotions since start:  {len(demotions)}")
    for demotion in demotions:
        lines.append(f"  {demotion.get('at')}: {demotion.get('from')}/{demotion.get('from_precision')} -> "
                     f"{demotion.get('to')}/{demotion.get('to_precision')}: {demotion.get('reason')}")
    return lines


def backend_options(config: Any) -> Any:
    """:class:`lungseg.predictors.BackendOptions` for the daemon: engines in ``<state>/engines``.

    GPU settings are read from the config when it has them (``dla_core``, ``cuda_graph``,
    ``gpu_mem_limit_mb``, ``cudnn_conv_algo_search``); absent ones keep their defaults.
    """
    from lungseg.backend_api import BackendOptions  # here: numpy, ~80 ms measured; `lungseg-edge status` needs none

    defaults = BackendOptions()
    return BackendOptions(
        threads=getattr(config, "threads", None),
        cpu_choice=getattr(config, "cpu_backend", None) or defaults.cpu_choice,
        engine_cache=Path(config.state_dir) / "engines",
        dla_core=getattr(config, "dla_core", None),
        cuda_graph=bool(getattr(config, "cuda_graph", False)),
        gpu_mem_limit_mb=getattr(config, "gpu_mem_limit_mb", None),
        cudnn_conv_algo_search=getattr(config, "cudnn_conv_algo_search", None) or defaults.cudnn_conv_algo_search,
        build_keepalive=extend_start_timeout,
        # the service is ready at once and measures the CPU candidates on a thread; a --once run measures first
        measure_in_background=not getattr(config, "once", False),
    )
