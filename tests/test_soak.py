"""A short kill -9 soak of the ``lungseg-edge`` service (``make soak`` runs 300 files and 15 kills)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import run_soak

pytestmark = pytest.mark.robustness


def test_short_kill9_soak_loses_doubles_and_truncates_nothing(tmp_path: Path, tiny_onnx: Path) -> None:
    report = run_soak(24, 3, tmp_path, tiny_onnx, seed=5, size=64, interval=(1.5, 3.5), finish_seconds=120)
    assert report.kills == 3
    assert report.ok, report.line()
