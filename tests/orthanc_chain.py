"""The whole DICOM chain against a real PACS: ``storescu`` -> lungseg-edge SCP -> segmentation -> Orthanc.

Used by ``tests/test_integration_orthanc.py`` (a few images) and by ``make integration``
(``python tests/orthanc_chain.py --count 50``), which prints a one-line summary and
exits non-zero when any check fails.

What runs, all real processes on loopback ports:

* Orthanc (Debian package ``orthanc``, DICOMweb plugin when ``orthanc-dicomweb`` is
  installed) with a temporary configuration: its own storage folder, no remote
  access, no authentication, only the listed modalities may store.
* ``lungseg-edge run`` with the Storage SCP, forwarding to Orthanc, and metrics.
* dcmtk ``storescu`` as the portable unit: it sends every radiograph to Orthanc and
  to the edge box, as a modality with two destinations does.

Orthanc is killed (SIGKILL) in the middle of the delivery burst and started again;
the checks then prove that nothing was lost or doubled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # the edge's TID 1500 Measurement Report (Comprehensive 3D SR)
OUTPUT_CLASSES = (SC_STORAGE, SEG_STORAGE, SR_STORAGE)
SOURCE_UID = "1.2.826.0.1.3680043.10.1082.77."
DICOMWEB_PLUGIN = Path(os.environ.get("LUNGSEG_ORTHANC_PLUGINS", "/usr/share/orthanc/plugins")) / \
    "libOrthancDicomWeb.so"
EDGE_AE, PACS_AE, UNIT_AE = "LUNGSEG", "ORTHANC", "PORTABLE1"


class ChainError(AssertionError):
    """A check of the chain failed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing_tools() -> list[str]:
    """What this machine lacks to run the chain (empty when everything is here)."""
    return [tool for tool in ("Orthanc", "storescu") if shutil.which(tool) is None]


def wait_for(what: str, check, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ChainError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- Orthanc ------------------------------------------------------------------------
@dataclass
class Orthanc:
    """An Orthanc process on loopback ports with a temporary configuration."""

    workdir: Path
    modalities: dict[str, tuple[str, int]]
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0
    tls: Path | None = None  # a folder from tls_pki.make_pki: the DICOM port speaks TLS only, client certs required

    @property
    def dicomweb(self) -> bool:
        return DICOMWEB_PLUGIN.is_file()

    def write_config(self) -> Path:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "lungseg-integration",
            "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": PACS_AE,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True, "DicomCheckCalledAet": True,
            "DicomModalities": {name.lower(): {"AET": name, "Host": "127.0.0.1", "Port": port, "AllowStore": True}
                                for name, (_, port) in self.modalities.items()},
            "SaveJobs": False, "HttpDescribeErrors": True,
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        if self.tls is not None:
            config |= {"DicomTlsEnabled": True, "DicomTlsCertificate": str(self.tls / "server.crt"),
                       "DicomTlsPrivateKey": str(self.tls / "server.key"),
                       "DicomTlsTrustedCertificates": str(self.tls / "ca.crt"),
                       "DicomTlsRemoteCertificateRequired": True}
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 60.0) -> Orthanc:
        config = self.write_config()
        log = (self.workdir / f"orthanc-{self.starts}.log").open("wb")
        self.process = subprocess.Popen([shutil.which("Orthanc") or "Orthanc", str(config)], stdout=log,
                                        stderr=subprocess.STDOUT, cwd=self.workdir)
        self.starts += 1

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise ChainError(f"Orthanc exited with {self.process.returncode}; see {log.name}")
            with contextlib.suppress(OSError, ChainError):
                return self.get("/system")["DicomAet"] == PACS_AE
            return False

        wait_for("Orthanc's REST API", up, timeout)
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, not a clean shutdown."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def request(self, path: str, accept: str | None = None) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        if accept:
            req.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise ChainError(f"Orthanc {path}: HTTP {exc.code}") from exc

    def get(self, path: str) -> Any:
        return json.loads(self.request(path))

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def holdings(self) -> list[dict[str, Any]]:
        """Every instance Orthanc holds, with the tags the checks need."""
        found = []
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            found.append({"id": orthanc_id, **tags})
        return found


# --- lungseg-edge -------------------------------------------------------------------
@dataclass
class EdgeBox:
    """``lungseg-edge run`` as a process: SCP in, Orthanc out, metrics on."""

    workdir: Path
    model: Path | None
    pacs_port: int
    scp_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    tls: Path | None = None  # tls_pki.make_pki's folder: receiver and forwarder on DICOM TLS, both mutual

    def start(self, timeout: float = 120.0) -> EdgeBox:
        watch, out = self.workdir / "watch", self.workdir / "out"
        watch.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "lungseg.edge_runtime.cli", "run", "--watch", str(watch), "--out", str(out),
               "--backend", "cpu", "--seg", "--batch-size", "4", "--log-json",
               "--scp-port", str(self.scp_port), "--scp-ae", EDGE_AE, "--scp-allow", UNIT_AE,
               "--forward-host", "127.0.0.1", "--forward-port", str(self.pacs_port), "--forward-ae", PACS_AE,
               "--forward-calling-ae", EDGE_AE, "--forward-retry-seconds", "1",
               "--metrics-port", str(self.metrics_port), "--health-stale-seconds", "120"]
        if self.model is not None:
            cmd += ["--model", str(self.model)]
        if self.tls is not None:
            cmd += ["--scp-tls-cert", str(self.tls / "server.crt"), "--scp-tls-key", str(self.tls / "server.key"),
                    "--scp-tls-ca", str(self.tls / "ca.crt"), "--forward-tls", "--forward-tls-ca",
                    str(self.tls / "ca.crt"), "--forward-tls-cert", str(self.tls / "client.crt"),
                    "--forward-tls-key", str(self.tls / "client.key")]
        log = (self.workdir / "lungseg-edge.log").open("wb")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def listening() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise ChainError(f"lungseg-edge exited with {self.process.returncode}: "
                                 + (self.workdir / "lungseg-edge.log").read_text()[-2000:])
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.scp_port), timeout=1):
                return True
            return False

        wait_for("the lungseg-edge receiver", listening, timeout)
        return self

    def scrape(self) -> dict[str, float]:
        """``/metrics`` as ``{'name{label="v"}': value}`` (samples of counters, gauges, histograms)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def healthz(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


# --- the portable unit --------------------------------------------------------------
def make_radiographs(folder: Path, count: int, per_study: int = 5) -> list[Path]:
    """``count`` real chest radiographs (the committed fixtures) as CR/DX DICOM files, ``per_study`` a study."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from edge_helpers import DX_PRESENTATION_STORAGE, make_cr, save

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        study = index // per_study
        ds = make_cr(f"{SOURCE_UID}{index + 1}", index=index, size=384, study_uid=f"{SOURCE_UID}9{study}",
                     series_uid=f"{SOURCE_UID}9{study}.1", pixel_spacing=(0.5, 0.5))
        ds.PatientID = f"SYN-{study:04d}"
        ds.AccessionNumber = f"ACC{study}"
        ds.InstanceNumber = index % per_study + 1
        if index % 2:  # every other one as Digital X-Ray (For Presentation)
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_PRESENTATION_STORAGE
            ds.Modality = "DX"
            ds.PresentationIntentType = "FOR PRESENTATION"
        paths.append(save(ds, folder / f"img{index:03d}.dcm"))
    return paths


def make_structured_report(path: Path) -> Path:
    """A Basic Text SR: a non-image object the edge box must refuse."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = SOURCE_UID + "999.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = SOURCE_UID + "999", SOURCE_UID + "999.2"
    ds.Modality, ds.PatientID, ds.PatientName = "SR", "SYN-SR", "Synthetic^Report"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def storescu(port: int, files: list[Path], calling: str = UNIT_AE, called: str = EDGE_AE,
             tls: Path | None = None) -> tuple[int, str]:
    """dcmtk ``storescu`` (with ``tls``: ``+tls`` with the client certificate); returns (exit code, its output)."""
    secure = [] if tls is None else ["+tls", str(tls / "client.key"), str(tls / "client.crt"), "-pw",
                                     "+cf", str(tls / "ca.crt")]
    result = subprocess.run(["storescu", "-v", *secure, "-aet", calling, "-aec", called, "127.0.0.1", str(port),
                             *map(str, files)], capture_output=True, text=True, timeout=300, check=False)
    return result.returncode, result.stdout + result.stderr


# --- the checks ---------------------------------------------------------------------
def _sr_source(sr: dict[str, Any], sources: dict[str, str]) -> str | None:
    """The source image an SR's evidence names (its evidence also lists the SEG)."""
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for item in series.get("ReferencedSOPSequence", []):
                if item.get("ReferencedSOPInstanceUID") in sources:
                    return str(item["ReferencedSOPInstanceUID"])
    return None


def check_holdings(holdings: list[dict[str, Any]], sources: dict[str, str]) -> dict[str, int]:
    """SC, SEG and SR for every source, exactly one of each, in the source's study, with their references."""
    by_class: dict[str, list[dict[str, Any]]] = {}
    for item in holdings:
        by_class.setdefault(item["SOPClassUID"], []).append(item)
    scs, segs, srs = (by_class.get(c, []) for c in OUTPUT_CLASSES)
    refs = {
        "sc": [sc["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] for sc in scs],
        "seg": [seg["ReferencedSeriesSequence"][0]["ReferencedInstanceSequence"][0]["ReferencedSOPInstanceUID"]
                for seg in segs],
        "sr": [_sr_source(sr, sources) for sr in srs],
    }
    lost = sum(len(set(sources) - set(r)) for r in refs.values())
    doubled = sum(len(r) - len(set(r)) for r in refs.values())
    pairs = [*zip(scs, refs["sc"], strict=True), *zip(segs, refs["seg"], strict=True),
             *zip(srs, refs["sr"], strict=True)]
    wrong_study = [item["SOPInstanceUID"] for item, ref in pairs if item["StudyInstanceUID"] != sources.get(ref)]
    if lost or doubled or wrong_study:
        raise ChainError(f"Orthanc holdings: {lost} output(s) lost, {doubled} doubled, "
                         f"{len(wrong_study)} outside the source's study")
    return {"sc": len(scs), "seg": len(segs), "sr": len(srs), "lost": lost, "doubled": doubled}


def check_rendered(orthanc: Orthanc, sc: dict[str, Any]) -> tuple[int, int]:
    """WADO-RS ``/rendered`` of an SC decodes to an image of the SC's size."""
    import cv2
    import numpy as np

    path = (f"/dicom-web/studies/{sc['StudyInstanceUID']}/series/{sc['SeriesInstanceUID']}"
            f"/instances/{sc['SOPInstanceUID']}/rendered")
    image = cv2.imdecode(np.frombuffer(orthanc.request(path, accept="image/png"), np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ChainError("WADO-RS rendered SC did not decode")
    shape = (int(sc["Rows"]), int(sc["Columns"]))
    if image.shape[:2] != shape:
        raise ChainError(f"WADO-RS rendered SC is {image.shape[:2]}, the SC is {shape}")
    return image.shape[0], image.shape[1]


def run_chain(workdir: Path, count: int, model: Path | None, kill_after: int | None = None,
              timeout: float = 600.0, per_study: int = 5, tls: bool = False) -> dict[str, Any]:
    """Run the chain with ``count`` radiographs; kill and restart Orthanc once after it holds ``kill_after``
    outputs (default: a third of them). With ``tls`` every DICOM hop (unit -> edge, unit -> Orthanc,
    edge -> Orthanc) is DICOM TLS with client certificates (made here with openssl).
    Returns the measured summary; raises :class:`ChainError`."""
    t_start = time.monotonic()
    files = make_radiographs(workdir / "unit", count, per_study)
    sr = make_structured_report(workdir / "unit-report" / "report.dcm")
    pki: Path | None = None
    if tls:
        from tls_pki import make_pki  # tests/ is on sys.path (make_radiographs)

        pki = make_pki(workdir / "pki")
    edge_port = free_port()
    orthanc = Orthanc(workdir / "orthanc", {EDGE_AE: ("127.0.0.1", edge_port), UNIT_AE: ("127.0.0.1", 104)},
                      tls=pki)
    box = EdgeBox(workdir / "edge", model, pacs_port=orthanc.dicom_port, scp_port=edge_port, tls=pki)
    summary: dict[str, Any] = {"radiographs": count, "tls": tls}
    try:
        orthanc.start()
        code, output = storescu(orthanc.dicom_port, files, called=PACS_AE, tls=pki)  # the unit's copy for the PACS
        if code != 0 or orthanc.instance_count() != count:
            raise ChainError(f"storescu to Orthanc failed ({code}): {output[-1500:]}")
        box.start()
        kill_after = max(1, (2 * count) // 3) if kill_after is None else kill_after
        if kill_after == 0:  # the PACS is down before the burst starts
            summary["outputs_before_restart"] = orthanc.instance_count() - count
            orthanc.kill()
        code, output = storescu(box.scp_port, files, tls=pki)
        if code != 0:
            raise ChainError(f"storescu to lungseg-edge failed ({code}): {output[-1500:]}")
        if kill_after > 0:  # Orthanc crashes in the middle of the burst
            wait_for(f"{kill_after} outputs in Orthanc", lambda: orthanc.instance_count() >= count + kill_after,
                     timeout, interval=0.05)
            # outputs it held when it went down (one more may land between this count and the kill)
            summary["outputs_before_restart"] = orthanc.instance_count() - count
            orthanc.kill()
        wait_for("a failed delivery while Orthanc is down",
                 lambda: box.scrape().get("lungseg_forward_failed_total", 0) > 0, timeout)
        time.sleep(2.0)
        orthanc.start()  # ... and comes back (the forwarder may deliver before Orthanc answers a query)
        wait_for(f"{3 * count} outputs in Orthanc", lambda: orthanc.instance_count() >= 4 * count, timeout)
        # refusals: a non-image SOP class, and a calling AE that is not on the allow-list
        sr_code, sr_output = storescu(box.scp_port, [sr], tls=pki)
        if sr_code == 0 or "Refused: SOPClassNotSupported" not in sr_output:
            raise ChainError(f"the SR was not refused: {sr_output[-800:]}")
        summary["sr_refused"] = "C-STORE status 0x0122 Refused: SOPClassNotSupported"
        bad_code, bad_output = storescu(box.scp_port, files[:1], calling="INTRUDER", tls=pki)
        if bad_code == 0 or "Association Rejected" not in bad_output:
            raise ChainError(f"the unknown calling AE was not rejected: {bad_output[-800:]}")
        reason = next((line.split("Reason:", 1)[1].strip() for line in bad_output.splitlines() if "Reason:" in line),
                      "")
        summary["intruder_rejected"] = reason or "association rejected"
        time.sleep(1.5)  # let the forwarder publish its last queue depth
        metrics = box.scrape()
        holdings = orthanc.holdings()
        checked = check_holdings(holdings, {p["SOPInstanceUID"]: p["StudyInstanceUID"] for p in holdings
                                            if p["SOPClassUID"] not in OUTPUT_CLASSES})
        summary.update(checked)
        summary["orthanc_instances"] = len(holdings)
        summary["studies"] = len(orthanc.get("/studies"))
        expected = {"lungseg_received_total": count, "lungseg_processed_total": count,
                    'lungseg_forwarded_total{kind="sc"}': checked["sc"],
                    'lungseg_forwarded_total{kind="seg"}': checked["seg"],
                    'lungseg_forwarded_total{kind="sr"}': checked["sr"],
                    'lungseg_refused_total{reason="sop_class"}': 1,
                    'lungseg_refused_total{reason="association"}': 1,
                    "lungseg_forward_queue_outputs": 0}
        mismatched = {k: (metrics.get(k), v) for k, v in expected.items() if metrics.get(k) != v}
        if mismatched:
            raise ChainError(f"/metrics does not match Orthanc: {mismatched}")
        if checked["sc"] != count or checked["seg"] != count or checked["sr"] != count:
            raise ChainError(f"expected {count} SC, SEG and SR each, Orthanc holds {checked['sc']}, "
                             f"{checked['seg']} and {checked['sr']}")
        summary["forward_failed"] = int(metrics.get("lungseg_forward_failed_total", 0))
        summary["metrics_match"] = True
        status, health = box.healthz()
        if status != 200:
            raise ChainError(f"/healthz {status}: {health}")
        if orthanc.dicomweb:
            sc = next(h for h in holdings if h["SOPClassUID"] == SC_STORAGE)
            summary["wado_rendered"] = "x".join(map(str, check_rendered(orthanc, sc)))
        else:
            summary["wado_rendered"] = "skipped (orthanc-dicomweb not installed)"
    finally:
        summary["edge_exit"] = box.stop()
        orthanc.stop()
    if summary["edge_exit"] != 0:
        raise ChainError(f"lungseg-edge exited with {summary['edge_exit']} on SIGTERM")
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    return (f"integration: {summary['radiographs']} radiographs via storescu -> lungseg-edge SCP -> Orthanc: "
            f"{summary['sc']} SC + {summary['seg']} SEG + {summary['sr']} SR in {summary['studies']} studies, "
            f"Orthanc killed+restarted after {summary['outputs_before_restart']} outputs "
            f"({summary['forward_failed']} failed attempts retried), lost {summary['lost']}, "
            f"duplicated {summary['doubled']}; SR refused ({summary['sr_refused']}); "
            f"INTRUDER rejected ({summary['intruder_rejected']}); /metrics matches Orthanc; "
            f"WADO-RS rendered {summary['wado_rendered']}; "
            f"{'every DICOM hop on mutual TLS; ' if summary.get('tls') else ''}{summary['seconds']} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the DICOM chain storescu -> lungseg-edge -> Orthanc and "
                                     "check it (exit 0 when every check passes).")
    parser.add_argument("--count", type=int, default=50, help="radiographs to send (default 50)")
    parser.add_argument("--model", type=Path, help="model bundle (default: the shipped model)")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--tls", action="store_true", help="every DICOM hop on DICOM TLS with client certificates "
                        "(needs the openssl CLI and an Orthanc built with DICOM TLS, 1.9+)")
    args = parser.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"integration: missing {', '.join(missing)} (apt-get install orthanc orthanc-dicomweb dcmtk)",
              file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lungseg-integration-") as tmp:
        workdir = args.workdir or Path(tmp)
        try:
            summary = run_chain(workdir, args.count, args.model, tls=args.tls)
        except ChainError as exc:
            print(f"integration: FAILED: {exc} (logs in {workdir} while it exists)", file=sys.stderr)
            if args.workdir is None:
                for log in sorted(Path(tmp).rglob("*.log")):
                    print(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
            return 1
    print(json.dumps(summary) if args.json else summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
