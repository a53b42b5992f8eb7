"""lungseg.atomic: the one durable, atomic file replacement every writer uses."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lungseg.atomic import TEMP_SUFFIX, atomic_write


def test_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    target.write_text("old")
    atomic_write(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    atomic_write(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_mode_sets_the_permissions_of_a_secret(tmp_path: Path) -> None:
    target = tmp_path / "key"
    atomic_write(target, b"k" * 32, mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(target, 12345)  # type: ignore[arg-type] - not bytes: fails while writing
    assert target.read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_a_link_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    target = tmp_path / "status.json"
    os.symlink(outside, target)
    atomic_write(target, "{}")
    assert outside.read_text() == "untouched" and not target.is_symlink() and target.read_text() == "{}"
