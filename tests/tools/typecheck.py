"""Type-check the core (``lungseg/*.py``, ``lungseg.nn``) and the edge runtime with mypy.

Like :mod:`check_layers`, it stages the ``.py`` files in the installed layout (``edge_runtime/``
is ``lungseg.edge_runtime``) so mypy sees the real module names. Settings: ``[tool.mypy]`` in
``pyproject.toml``. Exit code: mypy's.

usage: python tests/tools/typecheck.py [extra mypy arguments]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_layers import ROOT, stage

PACKAGES = ("lungseg.nn", "lungseg.edge_runtime")


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="lungseg-types-") as tmp:
        stage(ROOT, Path(tmp))
        core = [f"lungseg.{p.stem}" for p in sorted((ROOT / "lungseg").glob("*.py")) if p.stem != "__init__"]
        targets = [arg for m in core for arg in ("-m", m)] + [arg for p in PACKAGES for arg in ("-p", p)]
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *targets, *argv]
        env = dict(os.environ, MYPYPATH=tmp)
        return subprocess.run(cmd, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
