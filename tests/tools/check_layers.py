"""Check the import-layer contracts of ``pyproject.toml`` ([tool.importlinter]) with import-linter.

The installed package maps top-level folders into ``lungseg`` (``train/`` is ``lungseg.train``,
see ``[tool.setuptools.package-dir]``). import-linter reads packages from the file system, so
this script stages the ``.py`` files in the installed layout in a temporary folder and runs
``lint-imports`` there. Exit code: import-linter's (0 = every contract kept).

usage: python tests/tools/check_layers.py [extra lint-imports arguments]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def stage(root: Path, target: Path) -> None:
    """Copy every mapped package's ``.py`` files to ``target`` in the installed layout."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    mapping: dict[str, str] = project["tool"]["setuptools"]["package-dir"]
    for package in project["tool"]["setuptools"]["packages"]:
        source = root / mapping.get(package, package.replace(".", "/"))
        dest = target.joinpath(*package.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        for file in source.glob("*.py"):
            shutil.copy2(file, dest / file.name)


def _version(package: str) -> tuple[int, ...]:
    return tuple(int(p) for p in metadata.version(package).split(".")[:2] if p.isdigit())


def lint_imports(staged: Path, argv: list[str] = ()) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` on a staged tree with this project's contracts (output captured)."""
    env = dict(os.environ, PYTHONPATH=str(staged))
    lint = Path(sys.executable).with_name("lint-imports")
    config = [str(ROOT / "pyproject.toml")]
    if _version("import-linter") < (2, 16):  # before 2.16 the file comes with --config (Python 3.10 resolves 2.15)
        config.insert(0, "--config")
    cmd = [str(lint) if lint.exists() else "lint-imports", *config, "--no-logo", "--no-cache", *argv]
    return subprocess.run(cmd, cwd=staged, env=env, capture_output=True, text=True)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="lungseg-layers-") as tmp:
        stage(ROOT, Path(tmp))
        result = lint_imports(Path(tmp), argv)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
