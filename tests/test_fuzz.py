"""A short mutation fuzz of ``lungseg-edge run --once`` (``make fuzz`` runs thousands of inputs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import run_fuzz

pytestmark = pytest.mark.robustness


def test_short_fuzz_corpus_has_no_crash_hang_loop_or_lost_input(tmp_path: Path, tiny_onnx: Path) -> None:
    report = run_fuzz(70, tmp_path, tiny_onnx, seed=11, size=64, valid=5, memory_limit=1_500_000_000)
    assert report.ok, report.line()
    assert report.valid_processed == 5 and report.exit_codes[1] in (0, 1)
    assert report.quarantined >= 30 and len(report.codes) >= 5, report.line()  # the corpus really is hostile
