"""Prometheus /metrics and /healthz of a running ``lungseg-edge run`` process, scraped over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edge_helpers import REPO_ROOT, dicom_bytes, make_cr, store_all
from orthanc_chain import EdgeBox, free_port, wait_for

from lungseg.edge_runtime.sidecar import SCHEMA_ID

pytest.importorskip("prometheus_client", reason="prometheus-client (the [metrics] extra) is not installed")

UID = "1.2.826.0.1.3680043.10.1082.66."


class Daemon(EdgeBox):
    """The edge box with a short health window and a PACS that is not there yet."""

    def start(self, timeout: float = 120.0) -> Daemon:
        watch, out = self.workdir / "watch", self.workdir / "out"
        watch.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--watch", str(watch), "--out", str(out),
               "--backend", "cpu", "--seg", "--model", str(self.model), "--scp-port", str(self.scp_port),
               "--scp-allow", "PORTABLE1", "--metrics-port", str(self.metrics_port), "--health-stale-seconds", "1",
               "--forward-host", "127.0.0.1", "--forward-port", str(self.pacs_port), "--forward-ae", "TESTPACS",
               "--forward-retry-seconds", "1"]
        log = (self.workdir / "lungseg-edge.log").open("wb")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for("the metrics endpoint", lambda: self._up(), timeout)
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError((self.workdir / "lungseg-edge.log").read_text()[-2000:])
        try:
            with socket.create_connection(("127.0.0.1", self.scp_port), timeout=1):
                return self.scrape().get("lungseg_queue_files") is not None and self.healthz()[0] == 200
        except OSError:
            return False


@pytest.mark.integration
def test_scrape_a_running_daemon(tmp_path: Path, tiny_onnx: Path) -> None:
    from test_edge_forward import StorageSCP

    pacs_port = free_port()
    box = Daemon(tmp_path, tiny_onnx, pacs_port=pacs_port).start()
    scp = None
    try:
        # two radiographs by C-STORE; an unreadable file and a second copy of one radiograph dropped into the folder
        first = make_cr(UID + "1", size=96)
        assert store_all(box.scp_port, [first, make_cr(UID + "2", size=96, index=1)]) == [0, 0]
        (tmp_path / "watch" / "notes.dcm").write_bytes(b"not a DICOM file at all")
        (tmp_path / "watch" / "copy.dcm").write_bytes(dicom_bytes(first))
        wait_for("two files processed", lambda: box.scrape().get("lungseg_processed_total") == 2, 60)
        wait_for("the duplicate", lambda: box.scrape().get("lungseg_duplicates_total") == 1, 30)
        wait_for("the quarantine", lambda: box.scrape().get('lungseg_quarantined_total{reason="not_dicom"}') == 1
                 or any(k.startswith("lungseg_quarantined_total{") and v == 1 for k, v in box.scrape().items()), 30)
        wait_for("six outputs queued", lambda: box.scrape().get("lungseg_forward_queue_outputs") == 6, 30)
        m = box.scrape()
        assert m["lungseg_received_total"] == 2
        assert m['lungseg_stage_seconds_count{stage="receive"}'] == 2
        assert m['lungseg_stage_seconds_count{stage="decode"}'] == 2
        assert m['lungseg_stage_seconds_count{stage="write"}'] == 2
        assert m["lungseg_forward_failed_total"] >= 4  # the PACS is not there: every attempt failed
        assert m['lungseg_backend_info{backend="cpu",precision="fp32"}'] == 1
        flags: dict[str, int] = {}
        for sidecar in (tmp_path / "out").glob("*/*.json"):
            data = json.loads(sidecar.read_text())
            if data.get("schema") != SCHEMA_ID:
                continue  # the quarantine's reason file
            for flag in data["qa"]["flags"]:
                flags[flag] = flags.get(flag, 0) + 1
        assert {k[len('lungseg_flagged_total{flag="'):-2]: v for k, v in m.items()
                if k.startswith("lungseg_flagged_total{")} == flags
        assert m["lungseg_last_success_timestamp_seconds"] > time.time() - 60
        # outputs wait for a PACS that never answers: unhealthy once nothing was delivered for 1 s
        _, health = wait_for("/healthz 503", lambda: (s := box.healthz())[0] == 503 and s, 30)
        assert health["waiting_outputs"] == 6 and "waiting for delivery" in health["problems"][0]  # SC+SEG+SR x 2
        assert box.scrape()["lungseg_healthy"] == 0

        scp = StorageSCP(pacs_port)  # the PACS comes up: the queue drains, health recovers
        wait_for("delivery", lambda: box.scrape().get('lungseg_forwarded_total{kind="sr"}') == 2, 60)
        wait_for("/healthz 200", lambda: box.healthz()[0] == 200, 30)
        m = box.scrape()
        assert m['lungseg_forwarded_total{kind="sc"}'] == m['lungseg_forwarded_total{kind="seg"}'] == 2
        assert len(scp.received) == 6
        assert m["lungseg_last_forward_timestamp_seconds"] > time.time() - 60

        # a sender that stalls mid-file: one file waits, its age grows, health turns 503 again
        data = dicom_bytes(make_cr(UID + "3", size=96, index=2))
        with (tmp_path / "watch" / "slow.dcm").open("wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            _, health = wait_for("a waiting file", lambda: (s := box.healthz())[0] == 503 and s, 30)
            assert health["waiting_files"] == 1 and "none processed" in health["problems"][0]
            m = box.scrape()
            assert m["lungseg_queue_files"] == 1 and m["lungseg_queue_oldest_seconds"] > 1.0
            fh.write(data[len(data) // 2:])
        wait_for("the slow file processed", lambda: box.scrape().get("lungseg_processed_total") == 3, 60)
        wait_for("/healthz 200 again", lambda: box.healthz()[0] == 200, 30)
        box.process.send_signal(signal.SIGTERM)
        assert box.process.wait(60) == 0
    finally:
        box.stop()
        if scp is not None:
            scp.close()


def test_metrics_calls_are_no_ops_without_prometheus_client() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from lungseg.edge_runtime import service_metrics as metrics\n"
        "assert not metrics.available() and not metrics.enabled()\n"
        "metrics.count('processed'); metrics.count('quarantined', reason='x'); metrics.observe_stage('decode', 0.1)\n"
        "metrics.set_backend('cpu', 'fp32', True); metrics.processed_ok(); metrics.set_forward_queue(3)\n"
        "assert metrics.render() is None and metrics.health()[0] is True\n"
        "try:\n    metrics.enable()\nexcept metrics.MetricsUnavailableError as exc:\n    print('unavailable:', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "unavailable: metrics need prometheus-client" in result.stdout


@pytest.mark.integration
def test_metrics_port_in_use_is_a_configuration_error(tmp_path: Path, tiny_onnx: Path) -> None:
    (tmp_path / "watch").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--watch", str(tmp_path / "watch"), "--out",
             str(tmp_path / "out"), "--backend", "cpu", "--model", str(tiny_onnx), "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT)
    assert result.returncode == 2
    assert f"metrics: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_alert_rules_and_dashboard_use_only_exported_series() -> None:
    import re

    import yaml

    from lungseg.edge_runtime import service_metrics as metrics

    metrics.enable()
    try:
        for name, (_, labels) in metrics.COUNTERS.items():
            metrics.count(name, **{label: "x" for label in labels})
        metrics.observe_stage("decode", 0.1)
        metrics.set_backend("cpu", "fp32", True)
        from lungseg.drift import Comparison  # the drift gauges exist once the monitor published

        metrics.set_drift({("bundle", "count"): Comparison(50, {"noise": 0.2}, {"noise": 0.3})})
        exported = {line.split("{")[0].split(" ")[0] for line in metrics.render().decode().splitlines()
                    if line and not line.startswith("#")}
    finally:
        metrics.disable()
    rules = yaml.safe_load((REPO_ROOT / "packaging" / "prometheus-alerts.yml").read_text())["groups"][0]["rules"]
    dashboard = json.loads((REPO_ROOT / "packaging" / "grafana-dashboard.json").read_text())
    expressions = [rule["expr"] for rule in rules] + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\b(?:lungseg|process)_[a-z_]+", expr)}
    assert len(rules) >= 8 and len(dashboard["panels"]) >= 10
    assert used - exported == set(), f"series not exported: {sorted(used - exported)}"
    assert {"lungseg_healthy", "lungseg_queue_oldest_seconds", "lungseg_forward_failed_total",
            "lungseg_selftest_ok", "lungseg_flagged_files_total"} <= used
