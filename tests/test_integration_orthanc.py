"""The DICOM chain against a real PACS (Orthanc): storescu -> lungseg-edge SCP -> segmentation -> Orthanc.

The small version of ``make integration``: three radiographs in two studies, the PACS
down while they are processed (deliveries fail, are queued and retried once it is
back), a non-image SOP class refused, a calling AE not on the allow-list rejected,
and ``/metrics`` compared with what Orthanc holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from orthanc_chain import missing_tools, run_chain

pytestmark = pytest.mark.integration


def test_storescu_to_edge_box_to_orthanc_survives_a_pacs_restart(tmp_path: Path, tiny_onnx: Path) -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian packages orthanc, dcmtk)")
    pytest.importorskip("prometheus_client", reason="prometheus-client (the [metrics] extra) is needed for /metrics")
    summary = run_chain(tmp_path, count=3, model=tiny_onnx, kill_after=0, timeout=120, per_study=2)
    assert (summary["sc"], summary["seg"], summary["sr"], summary["lost"], summary["doubled"]) == (3, 3, 3, 0, 0)
    assert summary["orthanc_instances"] == 12 and summary["studies"] == 2
    assert summary["outputs_before_restart"] == 0 and summary["forward_failed"] >= 6
    assert summary["metrics_match"] and summary["edge_exit"] == 0
    assert "Calling AE" in summary["intruder_rejected"]
    if summary["wado_rendered"].startswith("skipped"):
        pytest.skip("orthanc-dicomweb not installed: WADO-RS rendering not checked (everything else passed)")
    rows, columns = map(int, summary["wado_rendered"].split("x"))  # the SC: the source full size (+ a text strip)
    assert columns == 384 and rows >= 384


def test_the_chain_on_mutual_dicom_tls(tmp_path: Path, tiny_onnx: Path) -> None:
    """storescu +tls -> the edge receiver on TLS -> the forwarder on TLS -> Orthanc with DicomTlsEnabled."""
    import shutil

    missing = missing_tools() + ([] if shutil.which("openssl") else ["openssl"])
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian packages orthanc, dcmtk, openssl)")
    pytest.importorskip("prometheus_client", reason="prometheus-client (the [metrics] extra) is needed for /metrics")
    summary = run_chain(tmp_path, count=2, model=tiny_onnx, kill_after=0, timeout=120, per_study=2, tls=True)
    assert summary["tls"] is True
    assert (summary["sc"], summary["seg"], summary["sr"], summary["lost"], summary["doubled"]) == (2, 2, 2, 0, 0)
    assert summary["metrics_match"] and summary["edge_exit"] == 0
    assert "Calling AE" in summary["intruder_rejected"]
