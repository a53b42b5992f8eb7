"""The import layers of pyproject.toml ([tool.importlinter]) hold, and an upward import breaks them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tests" / "tools" / "check_layers.py")
assert spec is not None and spec.loader is not None
check_layers = importlib.util.module_from_spec(spec)
sys.modules["check_layers"] = check_layers
spec.loader.exec_module(check_layers)


def _contracts() -> dict[str, dict]:
    project = check_layers.tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["id"]: c for c in project["tool"]["importlinter"]["contracts"]}


def test_the_contracts_hold_on_this_tree(tmp_path: Path) -> None:
    check_layers.stage(ROOT, tmp_path)
    result = check_layers.lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_core_module_is_under_the_core_contract() -> None:
    listed = set(_contracts()["core"]["source_modules"])
    present = {f"lungseg.{p.stem}" for p in (ROOT / "lungseg").glob("*.py") if p.stem != "__init__"}
    assert present - listed == set(), "add new core modules to the 'core' contract in pyproject.toml"
    assert listed - present == set(), "the 'core' contract names modules that no longer exist"


@pytest.mark.parametrize(("module", "line", "contract"), [
    # the core reaching up into the edge, hidden inside a function as the old code did
    ("lungseg/bundle.py", "def _probe():\n    from lungseg.edge_runtime import sdnotify\n", "the core imports nothing"),
    # the edge importing torch
    ("lungseg/edge_runtime/forward.py", "import torch\n", "the edge runtime stands on the core alone"),
    # export importing train (train may use export, not the reverse)
    ("lungseg/export/parity.py", "import lungseg.train.loss\n", "benchmarks > train > export"),
    # a circle between two core modules
    ("lungseg/atomic.py", "def _probe():\n    import lungseg.engine_cache\n", "no import cycles"),
])
def test_a_deliberate_upward_import_breaks_a_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    check_layers.stage(ROOT, tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + "\n\n" + line)
    result = check_layers.lint_imports(tmp_path)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
