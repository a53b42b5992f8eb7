"""The [gpu] extra as tests/tools/check_gpu_resolution.py expects it. The resolution itself (pip --dry-run --report
against PyPI for Python 3.10-3.12 on x86-64; about 2 minutes, network) runs as a step of .ci/run."""

from __future__ import annotations

import sys

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "tests" / "tools" / "check_gpu_resolution.py"


def test_gpu_extra_names_the_tensorrt_front_end_alone():
    """`import tensorrt` comes from the tensorrt-cu12 front-end, which pins bindings and libs to its own version."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import check_gpu_resolution as check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    extra = check.gpu_extra()
    assert any(r.startswith("tensorrt-cu12>=") for r in extra), extra
    assert not any(r.startswith(("tensorrt-cu12-bindings", "tensorrt-cu12-libs")) for r in extra), extra
    assert check.install_md_uses_spec()
