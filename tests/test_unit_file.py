"""The shipped systemd unit against the shipped sample config and the runtime's real exit codes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6)
    import tomli as tomllib

UNIT = REPO_ROOT / "packaging" / "lungseg-edge.service"
SAMPLE = REPO_ROOT / "packaging" / "lungseg-edge.toml"
MAX_EXPOSURE = 2.0


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of the unit, every occurrence kept (systemd allows repeats)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _within(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def test_every_folder_of_the_sample_config_is_writable_under_the_unit() -> None:
    config = tomllib.loads(SAMPLE.read_text())
    settings = unit_settings(UNIT.read_text())
    writable = [Path(p.lstrip("-")) for value in settings["ReadWritePaths"] for p in value.split()]
    assert settings["ProtectSystem"] == ["strict"]
    folders = {name: Path(config[name]) for name in ("watch", "out", "state")}
    for name, folder in folders.items():  # the receiver writes into watch; out, state and quarantine are written
        assert _within(folder, writable), f"{name} = {folder} is not in ReadWritePaths {writable}"
    assert any(f"/{folders['state'].name}" == f"/{d}" for d in settings["StateDirectory"])
    # the config the unit starts with is the one these folders come from
    assert re.search(r"--config /etc/lungseg/lungseg-edge\.toml\b", settings["ExecStart"][0])


def test_configuration_errors_do_not_restart_forever(tmp_path: Path) -> None:
    settings = unit_settings(UNIT.read_text())
    prevented = {int(code) for value in settings["RestartPreventExitStatus"] for code in value.split()}
    bad = tmp_path / "bad.toml"
    bad.write_text('watch = "."\nout = "out"\nno_such_setting = 1\n')
    result = subprocess.run([sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert "no_such_setting" in result.stderr
    assert result.returncode in prevented, (result.returncode, prevented)
    assert settings["Restart"] == ["on-failure"]


def test_resource_limits_and_sandboxing_are_set() -> None:
    settings = unit_settings(UNIT.read_text())
    for key in ("MemoryMax", "TasksMax", "LimitNOFILE", "ProtectProc", "SystemCallFilter", "IPAddressDeny"):
        assert key in settings, key
    assert int(settings["LimitNOFILE"][0]) >= 1024
    assert settings["SystemCallFilter"][0] == "@system-service"
    assert "IPAddressAllow=" in UNIT.read_text()  # the guidance: add the modalities and the PACS


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze (systemd) is not installed")
def test_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    exec_start = shutil.which("lungseg-edge") or str(Path(sys.executable).parent / "lungseg-edge")
    if not Path(exec_start).is_file():
        pytest.skip("no lungseg-edge console script in this environment (pip install -e .)")
    unit = tmp_path / "lungseg-edge.service"  # a real ExecStart: verify checks the binary exists
    unit.write_text(UNIT.read_text().replace("/opt/lungseg/venv/bin/lungseg-edge", exec_start))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                              text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert found, security.stdout[-2000:] + security.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, security.stdout
