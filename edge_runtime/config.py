"""Settings of ``lungseg-edge run``: defaults < TOML config file < command-line flags.

Each setting is declared once, below, as a field of :class:`EdgeConfig` (the image gate's in
:class:`lungseg.gate_options.GateOptions`, which it extends): name, type, default, choices, help
and its place in the sample file. From that declaration (:mod:`lungseg.settings_schema`) come the
TOML loader's checks, the ``run`` flags and their help, and the sample file
``packaging/lungseg-edge.toml`` (``lungseg-edge config --sample``); ``tests/test_settings_schema.py``
fails when the committed file or the flags drift from it.

The TOML file holds the same names as the flags, with underscores (dashes are accepted too), at
top level or in an ``[edge]`` table. Relative paths in the file are resolved against the file's
own folder. Unknown keys are an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lungseg import settings_schema as schema
from lungseg.edge_runtime.modalities import ModalityError, network_bind_problem, parse_modalities
from lungseg.errors import LungsegError
from lungseg.gate_options import ABOUT as GATE_ABOUT
from lungseg.gate_options import SECTION as GATE_SECTION
from lungseg.gate_options import GateOptions, add_gate_arguments
from lungseg.settings_schema import setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6) needs the tomli backport
    import tomli as tomllib

BACKENDS = ("auto", "tensorrt", "cuda", "cpu", "openvino")  # lungseg.predictors.BACKENDS (kept import-free)
# lungseg.predictors.CPU_CHOICES
CPU_BACKEND_CHOICES = ("fastest", "chain", "openvino-int8", "openvino-gpu", "openvino-npu", "openvino-bf16",
                       "openvino-fp32", "cpu-int8", "cpu-fp32")
QUARANTINE_MODES = ("copy", "move")
ROOT_POLICIES = ("warn", "refuse", "allow")
SC_SYNTAXES = ("explicit", "rle", "jpegls")
SC_STYLES = ("outline", "filled-outline")
SC_VERIFY = ("parse", "decode")
POSTPROCESS_RESOLUTIONS = ("model", "native")
DEFAULT_IGNORE = ("*.part", "*.tmp", "*.partial", "*.filepart", "*.crdownload", "*.swp", "*~")


class ConfigError(LungsegError, ValueError):
    """A configuration file or flag combination that cannot be used."""


FOLDERS, MODEL, OUTPUTS, WATCHING, FAULTS, UNTRUSTED, FORWARD, RECEIVER, METRICS, LOGGING = (
    "Folders", "Model and inference", "Outputs", "Watching", "Output faults and quarantine", "Untrusted input",
    "Forwarding to a PACS", "DICOM receiver", "Metrics and health check", "Logging")

AUDIT_RETENTION = "Audit trail, disk guard and retention"

SECTIONS: tuple[tuple[str, str], ...] = (  # the sample file's order, and the --help groups
    (FOLDERS, ""),
    (MODEL, ""),
    (OUTPUTS, "Per input: <out>/<StudyInstanceUID>/<SOPInstanceUID>.sc.dcm (overlay Secondary Capture), "
     ".seg.dcm (with seg) and .json (sidecar)."),
    (GATE_SECTION, GATE_ABOUT),
    (WATCHING, "inotify by default. A file is complete when inotify reports close-after-write (or a rename into "
     "the folder) and nothing changed for settle_seconds; without such an event (polling, files present at "
     "start) its size and mtime must stay unchanged for stable_seconds."),
    (FAULTS, ""),
    (UNTRUSTED, "Decoding runs in a separate worker process with an address-space limit and a per-file timeout; "
     "a crash, hang or out-of-memory quarantines that file only (decoder_crash / decoder_timeout / decoder_oom). "
     "Files are also refused from the header alone, before any decoding (too_many_pixels, too_many_frames, "
     "file_too_large; also codestream_size_mismatch when a JPEG 2000 / JPEG code stream is larger than Rows x "
     "Columns)."),
    (FORWARD, "Optional: also send each SC (and SEG) to a PACS by C-STORE (needs pynetdicom). The queue lives in "
     "the ledger, so nothing is lost while the PACS is down; failed sends are retried with exponential backoff."),
    (RECEIVER, "Optional: receive radiographs by DICOM C-STORE (a Storage SCP) into the watch folder; the folder "
     "watch keeps working beside it. CR and DX (for presentation and for processing) are stored; other SOP "
     "classes are refused with C-STORE status 0x0122. Each image is written under a hidden temp name, fsynced "
     "and renamed before the sender is told \"success\"."),
    (METRICS, "Optional: Prometheus metrics on http://<metrics_bind>:<metrics_port>/metrics and a health check on "
     "/healthz. Needs lungseg[metrics]."),
    (LOGGING, "Logs, sidecars and quarantine names identify a file by a keyed hash of its path (\"f-\" + 16 hex "
     "digits; the key is <state>/name-key), never by its name, which may carry a patient's name. UIDs are "
     "logged as hashes and patient names/IDs never."),
    (AUDIT_RETENTION, (
     "The audit trail is an append-only, hash-chained JSON Lines file, <state>/audit/audit.jsonl: one line per "
     "receive, process, output, forward, quarantine, retention deletion, start, configuration or model change, "
     "self-test and demotion (lungseg-edge audit verify / audit show). Files are named by their reference and "
     "content hash, UIDs by a keyed hash. The disk guard: below the free-space watermark (watch, output or state "
     "folder) the receiver answers C-STORE with 0xA700 (out of resources), the folder path takes no new work "
     "and /healthz answers 503 with the reason; work resumes by itself once 10 % more than the watermark is "
     "free. Retention (0 days: keep) deletes only what the ledger has handled, each deletion audited.")),
)

SAMPLE_HEADER = """\
# lungseg-edge configuration (TOML). Generated by `lungseg-edge config --sample` from the settings'
# declaration in lungseg.edge_runtime.config: change a setting there, then regenerate this file.
# Every key is optional here and can be overridden by the command-line flag of the same name
# (dashes instead of underscores, e.g. --batch-size). A line holds the setting's default unless it
# is commented out or its comment names the default. Relative paths are resolved against the
# folder of this file. Unknown keys are an error.
#
#   lungseg-edge run --config /etc/lungseg/lungseg-edge.toml
#
# Research use - not for diagnosis.
"""


@dataclass
class EdgeConfig(GateOptions):
    """Everything ``lungseg-edge run`` needs (the gate's settings come from :class:`GateOptions`)."""

    # --- folders
    watch: Path | None = field(default=None, metadata=setting(
        section=FOLDERS, sample="/srv/lungseg/incoming", default_text="none; required", metavar="DIR",
        help="folder the DICOM receiver / share writes into, watched for radiographs (never modified, except "
        "with quarantine_mode move)"))
    out: Path | None = field(default=None, metadata=setting(
        section=FOLDERS, sample="/srv/lungseg/out", default_text="none; required", metavar="DIR",
        help="output folder: <out>/<StudyInstanceUID>/<SOPInstanceUID>.sc.dcm, .seg.dcm, .json"))
    state: Path | None = field(default=None, metadata=setting(
        section=FOLDERS, sample="/var/lib/lungseg", metavar="DIR",
        default_text="the ledger in <out>/.lungseg-state, quarantine in <out>/quarantine",
        help="ledger (SQLite) and quarantine folder"))
    # --- model and inference
    model: Path | None = field(default=None, metadata=setting(
        section=MODEL, commented=True, sample="/opt/lungseg/models/lung-v1", metavar="BUNDLE",
        default_text="the model shipped with the package",
        help="model bundle folder (from lungseg-export) or a single .onnx file"))
    backend: str = field(default="auto", metadata=setting(
        section=MODEL, choices=BACKENDS,
        help="inference backend; auto = TensorRT engine -> onnxruntime CUDA -> CPU (OpenVINO where the [openvino] "
        "extra is installed, onnxruntime; see cpu_backend); each fallback is logged"))
    threads: int | None = field(default=None, metadata=setting(
        section=MODEL, commented=True, sample=4, default_text="onnxruntime's", help="CPU inference threads"))
    cpu_backend: str = field(default="fastest", metadata=setting(
        section=MODEL, choices=CPU_BACKEND_CHOICES,
        help="which CPU backend serves: fastest = where OpenVINO is installed ([openvino] extra), self-test and "
        "time every CPU candidate on the golden set at start-up and serve the fastest that passes (measured once "
        "per bundle, CPU, runtime versions and devices found, kept in <state>/engines; why is in backend.json); "
        "chain = the first that passes, OpenVINO int8 -> Intel GPU -> Intel NPU -> bf16 -> fp32 -> onnxruntime "
        "int8 -> fp32 (the GPU and NPU only where OpenVINO finds them); a candidate's name pins it first"))
    dla_core: int | None = field(default=None, metadata=setting(
        section=MODEL, commented=True, sample=0, metavar="N", default_text="none, the GPU",
        help="TensorRT on DLA core N (Jetson AGX/NX Orin): a static one-image engine, built once into "
        "<state>/engines (or beforehand with `lungseg-export --engine-only --dla-core N --state <state>`); "
        "layers the DLA cannot run fall back to the GPU (the build logs how many)"))
    cuda_graph: bool = field(default=False, metadata=setting(
        section=MODEL, commented=True,
        help="TensorRT: capture each batch size's inference as a CUDA graph after a warm-up run and replay it "
        "(lower launch overhead on small GPUs); a failed capture runs that batch without the graph"))
    threshold: float | None = field(default=None, metadata=setting(
        section=MODEL, commented=True, sample=0.5, metavar="P", default_text="the model's own, else 0.5",
        help="probability threshold"))
    batch_size: int = field(default=4, metadata=setting(
        section=MODEL, help="most files per inference batch when several are waiting"))
    # --- outputs
    sc: bool = field(default=True, metadata=setting(
        section=OUTPUTS, help="write the overlay Secondary Capture (the source at full resolution with the lung "
        "outline, areas and review banner); off: SEG + SR only, and the source is decoded at the reduced "
        "resolution alone (the fast path)"))
    seg: bool = field(default=True, metadata=setting(
        section=OUTPUTS, help="write a DICOM Segmentation (BINARY, segment \"Lung\") per input"))
    sr: bool = field(default=True, metadata=setting(
        section=OUTPUTS, help="beside the SEG, write a DICOM SR Measurement Report (TID 1500): lung areas, QA flags "
        "and gate decisions, referencing the SEG's segment and naming the model"))
    gsps: bool = field(default=False, metadata=setting(
        section=OUTPUTS, help="also write a Grayscale Softcopy Presentation State (.pr.dcm): the lung contours and "
        "areas drawn over the original image by viewers that apply presentation states, no pixels re-encoded"))
    sc_style: str = field(default="outline", metadata=setting(
        section=OUTPUTS, choices=SC_STYLES,
        help="overlay style: outline (the radiograph untouched inside the lungs) or filled-outline (a light fill)"))
    sc_syntax: str = field(default="explicit", metadata=setting(
        section=OUTPUTS, choices=SC_SYNTAXES,
        help="Secondary Capture transfer syntax: explicit (Explicit VR Little Endian, uncompressed: the fastest), "
        "rle (RLE Lossless) or jpegls (JPEG-LS Lossless: smallest, slowest)"))
    sc_max_side: int = field(default=0, metadata=setting(
        section=OUTPUTS, metavar="PX",
        help="cap the SC's long side at this many pixels, never below 1024 (0: the source's full resolution)"))
    sc_verify: str = field(default="parse", metadata=setting(
        section=OUTPUTS, choices=SC_VERIFY,
        help="check each written SC by parsing it and its pixel data length (parse) or by decoding it and "
        "comparing every pixel (decode)"))
    decode_min_side: int = field(default=256, metadata=setting(
        section=OUTPUTS, metavar="PX",
        help="the model's input is made from the coarsest 1/2^k resolution whose short side stays >= this many "
        "pixels (256 is the model's input size, so the network never sees an upsampled image; 0: full resolution). "
        "With the SC on, the source is decoded once at full size for the overlay and this is its area reduction; "
        "with sc = false, JPEG 2000 is decoded at that level directly"))
    postprocess_resolution: str = field(default="model", metadata=setting(
        section=OUTPUTS, choices=POSTPROCESS_RESOLUTIONS,
        help="postprocess and measure at the model's resolution and upscale the mask once (model) or at native "
        "size (native, slower)"))
    # --- watching
    polling: bool = field(default=False, metadata=setting(
        section=WATCHING,
        help="poll the folder instead of using inotify: for network shares (NFS, SMB), where inotify does not see "
        "writes made by other machines"))
    poll_interval: float = field(default=2.0, metadata=setting(
        section=WATCHING, metavar="S", help="seconds between polls"))
    settle_seconds: float = field(default=0.5, metadata=setting(
        section=WATCHING, metavar="S",
        help="a file with a close or rename event is complete after this long unchanged"))
    stable_seconds: float = field(default=2.0, metadata=setting(
        section=WATCHING, metavar="S",
        help="without such an event, size and mtime must stay unchanged this long (raise it if senders pause "
        "mid-file)"))
    recursive: bool = field(default=True, metadata=setting(section=WATCHING, help="also watch sub-folders"))
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE), metadata=setting(
        section=WATCHING, metavar="GLOB,GLOB", help="names never picked up (hidden names are always ignored)"))
    rescan_seconds: float = field(default=300.0, metadata=setting(
        section=WATCHING, metavar="S",
        help="full re-scan of the watch folder every so often (a safety net for lost events; 0: never)"))
    once: bool = field(default=False, metadata=setting(
        section=WATCHING, commented=True, help="process what is in the folder, then exit (not for the service)"))
    # --- output faults and quarantine
    retry_seconds: float = field(default=30.0, metadata=setting(
        section=FAULTS, metavar="S",
        help="retry delay after an output fault (disk full, no permission, read-only), doubled on every failure of "
        "the same file up to max_retry_seconds; --once leaves such files undone (exit 6)"))
    max_retry_seconds: float = field(default=600.0, metadata=setting(
        section=FAULTS, metavar="S", help="longest output-fault retry delay"))
    quarantine_grace_seconds: float = field(default=10.0, metadata=setting(
        section=FAULTS, metavar="S",
        help="an input that cannot be used but changed less than this long ago is looked at again instead of "
        "quarantined (a sender may still be adding to it)"))
    quarantine_mode: str = field(default="copy", metadata=setting(
        section=FAULTS, choices=QUARANTINE_MODES,
        help="copy rejected inputs to the quarantine folder, or move them there (out of the watch folder)"))
    run_as_root: str = field(default="warn", metadata=setting(
        section=FAULTS, choices=ROOT_POLICIES,
        help="when started as root: log a warning, refuse to start (exit 2), or allow silently"))
    # --- untrusted input
    isolate_decode: bool = field(default=True, metadata=setting(
        section=UNTRUSTED, help="decode in a memory- and time-limited worker process (off: in-process)"))
    decode_timeout_seconds: float = field(default=60.0, metadata=setting(
        section=UNTRUSTED, metavar="S", help="decoding time limit per file"))
    decode_memory_mb: int = field(default=2048, metadata=setting(
        section=UNTRUSTED, metavar="MB", help="address-space limit of the decoding worker"))
    gpu_decode: bool = field(default=False, metadata=setting(
        section=UNTRUSTED, help="decode JPEG 2000 / HTJ2K frames on the GPU with nvImageCodec (pip install "
        "'nvidia-nvimgcodec-cu12[nvjpeg2k]'), in this process within the max_* limits; any refusal "
        "or error: the CPU decoder in its worker. Off until verified on your GPU (not yet run on one by the "
        "project)"))
    max_pixels: int = field(default=50_000_000, metadata=setting(
        section=UNTRUSTED, help="most pixels (all frames) of an input"))
    max_frames: int = field(default=64, metadata=setting(section=UNTRUSTED, help="most frames of an input"))
    max_file_mb: int = field(default=512, metadata=setting(section=UNTRUSTED, metavar="MB", help="largest input file"))
    # --- forwarding
    forward_host: str | None = field(default=None, metadata=setting(
        section=FORWARD, commented=True, sample="pacs.example.org", metavar="HOST",
        default_text="none, no forwarding", help="also C-STORE each SC (and SEG) to this DICOM peer"))
    forward_port: int = field(default=104, metadata=setting(
        section=FORWARD, commented=True, metavar="PORT", help="the peer's port"))
    forward_ae: str = field(default="ANY-SCP", metadata=setting(
        section=FORWARD, commented=True, sample="PACS", metavar="AET", help="the peer's (called) AE title"))
    forward_calling_ae: str = field(default="LUNGSEG", metadata=setting(
        section=FORWARD, commented=True, metavar="AET", help="our (calling) AE title; the PACS must know it"))
    forward_retry_seconds: float = field(default=60.0, metadata=setting(
        section=FORWARD, commented=True, metavar="S",
        help="first retry delay after a failed delivery, doubling up to an hour"))
    forward_max_attempts: int = field(default=12, metadata=setting(
        section=FORWARD, commented=True, metavar="N",
        help="failed deliveries of one output before it is dead-lettered (kept, /healthz 503, `lungseg-edge "
        "forward retry` sends it again); a C-ECHO probe brings retries forward when the peer is back"))
    # --- receiver
    scp_port: int | None = field(default=None, metadata=setting(
        section=RECEIVER, commented=True, sample=11112, metavar="PORT", default_text="none, no receiver",
        help="receive images by DICOM C-STORE on this port, into the watch folder"))
    scp_ae: str = field(default="LUNGSEG", metadata=setting(
        section=RECEIVER, commented=True, metavar="AET", help="the receiver's AE title"))
    scp_bind: str = field(default="127.0.0.1", metadata=setting(
        section=RECEIVER, commented=True, sample="0.0.0.0", metavar="ADDR",
        help="address the receiver listens on (0.0.0.0: the network; 127.0.0.1: this machine only)"))
    scp_allow: list[str] = field(default_factory=list, metadata=setting(
        section=RECEIVER, commented=True, sample=["PORTABLE1@192.0.2.10"], metavar="AET@HOST,...",
        default_text="empty, any sender (loopback only)",
        help="the modality list: senders allowed to store, each \"AET\" (any host), \"AET@host\" or "
        "\"AET@host:port\"; a calling AE title is accepted only from the host its entry names"))
    scp_accept_any: bool = field(default=False, metadata=setting(
        section=RECEIVER, commented=True,
        help="let a receiver bound to a network address (not loopback) accept senders whose host scp_allow "
        "does not name; without it such a receiver needs every scp_allow entry as \"AET@host\""))
    # --- the receiver's connection limits (edge_runtime/scp_guard.py; INSTALL.md "The DICOM receiver")
    scp_max_associations: int = field(default=8, metadata=setting(
        section=RECEIVER, commented=True, metavar="N",
        help="established associations at once (one more is closed at once; connections still negotiating "
        "have a pool of their own)"))
    scp_max_per_host: int = field(default=4, metadata=setting(
        section=RECEIVER, commented=True, metavar="N", help="established associations at once from one address"))
    scp_handshake_seconds: float = field(default=10.0, metadata=setting(
        section=RECEIVER, commented=True, metavar="S",
        help="a connection must complete association negotiation within this, however many bytes it trickles"))
    scp_association_seconds: float = field(default=600.0, metadata=setting(
        section=RECEIVER, commented=True, metavar="S", help="the longest an association may last in all"))
    # --- DICOM TLS (edge_runtime/tls.py): TLS 1.2+ only; see INSTALL.md "DICOM TLS"
    scp_tls_cert: Path | None = field(default=None, metadata=setting(
        section=RECEIVER, commented=True, sample="/etc/lungseg/tls/server.crt", metavar="PEM",
        default_text="none, plain DICOM",
        help="the receiver's certificate (PEM, leaf first, then any intermediates); set: the receiver speaks "
        "DICOM TLS only and refuses plain connections"))
    scp_tls_key: Path | None = field(default=None, metadata=setting(
        section=RECEIVER, commented=True, sample="/etc/lungseg/tls/server.key", metavar="PEM",
        default_text="in scp_tls_cert", help="the private key of scp_tls_cert (unencrypted PEM, readable by the "
        "service only)"))
    scp_tls_ca: Path | None = field(default=None, metadata=setting(
        section=RECEIVER, commented=True, sample="/etc/lungseg/tls/senders-ca.crt", metavar="PEM",
        default_text="none", help="CA bundle that signs the senders' (modalities') client certificates"))
    scp_tls_require_client_cert: bool = field(default=True, metadata=setting(
        section=RECEIVER, commented=True,
        help="with TLS: refuse senders without a client certificate signed by scp_tls_ca (mutual "
        "authentication); false: a client certificate is verified only when one is presented"))
    forward_tls: bool = field(default=False, metadata=setting(
        section=FORWARD, commented=True,
        help="send to the PACS over DICOM TLS: its certificate is verified and its name checked"))
    forward_tls_ca: Path | None = field(default=None, metadata=setting(
        section=FORWARD, commented=True, sample="/etc/lungseg/tls/pacs-ca.crt", metavar="PEM",
        default_text="the system trust store", help="CA bundle that signs the PACS certificate"))
    forward_tls_cert: Path | None = field(default=None, metadata=setting(
        section=FORWARD, commented=True, sample="/etc/lungseg/tls/client.crt", metavar="PEM",
        default_text="none", help="our client certificate, for a PACS that requires mutual authentication"))
    forward_tls_key: Path | None = field(default=None, metadata=setting(
        section=FORWARD, commented=True, sample="/etc/lungseg/tls/client.key", metavar="PEM",
        default_text="in forward_tls_cert", help="the private key of forward_tls_cert"))
    forward_tls_server_name: str | None = field(default=None, metadata=setting(
        section=FORWARD, commented=True, sample="pacs.example.org", metavar="NAME", default_text="forward_host",
        help="the name (DNS or IP subject alternative name) the PACS certificate must carry"))
    # --- metrics and health
    metrics_port: int | None = field(default=None, metadata=setting(
        section=METRICS, commented=True, sample=9464, metavar="PORT", default_text="none, no endpoint",
        help="serve Prometheus /metrics and /healthz on this port"))
    metrics_bind: str = field(default="127.0.0.1", metadata=setting(
        section=METRICS, commented=True, metavar="ADDR", help="address of the metrics endpoint"))
    health_stale_seconds: float = field(default=600.0, metadata=setting(
        section=METRICS, commented=True, metavar="S",
        help="/healthz answers 503 when work has waited this long and nothing succeeded meanwhile"))
    health_fault_seconds: float = field(default=120.0, metadata=setting(
        section=METRICS, commented=True, metavar="S",
        help="/healthz answers 503 when faults of the box (outputs not writable, no memory) went on this long "
        "with no file processed since the first (retries do not reset the clock)"))
    # --- logging
    log_json: bool = field(default=False, metadata=setting(
        section=LOGGING, sample=True, help="one JSON object per log line (journald-friendly)"))
    log_uids: bool = field(default=False, metadata=setting(
        section=LOGGING, help="log DICOM UIDs in clear instead of hashed"))
    log_file_names: bool = field(default=False, metadata=setting(
        section=LOGGING,
        help="identify files by their path relative to the watch folder instead of a keyed hash"))
    verbose: int = field(default=0, metadata=setting(
        section=LOGGING, short="-v", count=True,
        help="more logging: 0 = info, 1 (-v) = debug, 2 (-vv) = debug including libraries"))

    # --- audit trail, disk guard and retention (edge_runtime/audit.py, edge_runtime/retention.py)
    audit: bool = field(default=True, metadata=setting(
        section=AUDIT_RETENTION, help="keep the audit trail in <state>/audit"))
    audit_uids: bool = field(default=False, metadata=setting(
        section=AUDIT_RETENTION, help="write SOP and study UIDs in clear in the audit trail instead of a keyed hash"))
    audit_max_mb: int = field(default=64, metadata=setting(
        section=AUDIT_RETENTION, metavar="MB",
        help="start a new audit file at this size (the chain continues; old files are kept)"))
    disk_min_free_mb: int = field(default=512, metadata=setting(
        section=AUDIT_RETENTION, metavar="MB", help="disk guard: least free space in MB (0: not checked)"))
    disk_min_free_percent: float = field(default=2.0, metadata=setting(
        section=AUDIT_RETENTION, metavar="PCT",
        help="disk guard: least free space in percent of the file system (0: not checked)"))
    retention_received_days: float = field(default=0.0, metadata=setting(
        section=AUDIT_RETENTION, metavar="DAYS",
        help="delete files the receiver wrote into the watch folder this long after arrival, once processed "
        "(0: keep)"))
    retention_watch_files: bool = field(default=False, metadata=setting(
        section=AUDIT_RETENTION,
        help="let retention_received_days also delete the device's own processed files in the watch folder"))
    retention_output_days: float = field(default=0.0, metadata=setting(
        section=AUDIT_RETENTION, metavar="DAYS",
        help="delete outputs this old, unless still to be forwarded (0: keep)"))
    retention_quarantine_days: float = field(default=0.0, metadata=setting(
        section=AUDIT_RETENTION, metavar="DAYS", help="delete quarantined files this old (0: keep)"))
    retention_log_days: float = field(default=0.0, metadata=setting(
        section=AUDIT_RETENTION, metavar="DAYS", help="delete crash logs (crash.log.*) this old (0: keep)"))
    retention_min_free_mb: float = field(default=0.0, metadata=setting(
        section=AUDIT_RETENTION, metavar="MB",
        help="below this much free space on the output or watch folder's file system, delete the oldest "
        "deletable files (handled received files, delivered outputs, quarantine) whatever their age until "
        "there is room; above disk_min_free_mb (0: off)"))

    # --- drift monitor (edge_runtime/drift_monitor.py; issue 23) ---
    drift: bool = field(default=True, metadata=setting(
        section=METRICS, help="drift monitor: compare recent images' descriptors with the bundle's "
        "drift_reference.json (off, said once in the log, when the bundle has none); lungseg-edge drift reports"))
    drift_window: int = field(default=100, metadata=setting(
        section=METRICS, metavar="N", help="drift monitor: images in the count window (the other window: 24 h)"))
    drift_site_after: int = field(default=500, metadata=setting(
        section=METRICS, metavar="N",
        help="drift monitor: the site's first N images become its own second reference (0: never)"))

    # --- derived locations -------------------------------------------------
    @property
    def watch_dir(self) -> Path:
        """The watch folder of a validated config (``validate`` requires it)."""
        if self.watch is None:
            raise ConfigError("no watch folder: set --watch or watch in the config file")
        return Path(self.watch)

    @property
    def out_dir(self) -> Path:
        """The output folder of a validated config (``validate`` requires it)."""
        if self.out is None:
            raise ConfigError("no output folder: set --out or out in the config file")
        return Path(self.out)

    @property
    def state_dir(self) -> Path:
        """Ledger and lock: ``--state``, else ``<out>/.lungseg-state``."""
        if self.state is not None:
            return self.state
        assert self.out is not None
        return self.out / ".lungseg-state"

    @property
    def quarantine_dir(self) -> Path:
        """``<state>/quarantine`` when ``--state`` is given, else ``<out>/quarantine``."""
        base = self.state if self.state is not None else self.out
        assert base is not None
        return base / "quarantine"

    def decode_limits(self):
        """The header limits for :func:`lungseg.dicom_decode.read_dicom` (``max_file_mb``, ``max_pixels``...)."""
        from lungseg.dicom_decode import DecodeLimits  # imports pydicom (~0.2 s): not for `lungseg-edge --help`

        return DecodeLimits(max_file_bytes=self.max_file_mb << 20, max_pixels=self.max_pixels,
                            max_frames=self.max_frames)

    def gate_policy(self):
        """The image gate's :class:`lungseg.gate.GatePolicy` (raises ValueError when invalid)."""
        from lungseg.gate import policy_from_settings  # imports cv2, numpy, onnx helpers (~0.45 s): not for --help

        return policy_from_settings(self)

    def validate(self) -> EdgeConfig:
        if self.watch is None or self.out is None:
            raise ConfigError("both a watch folder (--watch) and an output folder (--out) are required")
        try:
            schema.check_choices(self)
        except schema.SettingError as exc:
            raise ConfigError(str(exc)) from None
        try:
            self.gate_policy()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("sc_max_side", "decode_min_side"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative (0: no limit / full resolution)")
        if self.dla_core is not None and self.dla_core < 0:
            raise ConfigError("dla_core must be 0 or more (a DLA core's number)")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        if not (self.sc or self.seg):
            raise ConfigError("sc = false needs seg = true: with neither an SC nor a SEG there is nothing to write")
        for name in ("decode_timeout_seconds", "decode_memory_mb", "max_file_mb", "max_pixels", "max_frames"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("poll_interval", "stable_seconds", "settle_seconds", "retry_seconds", "rescan_seconds",
                     "quarantine_grace_seconds", "max_retry_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError("threshold must lie strictly between 0 and 1")
        for name in ("forward_ae", "forward_calling_ae"):
            title = getattr(self, name)
            if not 0 < len(title) <= 16 or "\\" in title or not title.isascii():
                raise ConfigError(f"{name} must be 1-16 ASCII characters (a DICOM AE title)")
        if not 0 < self.forward_port < 65536:
            raise ConfigError("forward_port must be a TCP port number")
        for name in ("scp_port", "metrics_port"):  # 0: any free port (tests)
            port = getattr(self, name)
            if port is not None and not 0 <= port < 65536:
                raise ConfigError(f"{name} must be a TCP port number")
        if not 0 < len(self.scp_ae) <= 16 or "\\" in self.scp_ae or not self.scp_ae.isascii() \
                or not self.scp_ae.strip():
            raise ConfigError(f"scp_ae must be 1-16 ASCII characters, not {self.scp_ae!r}")
        try:
            parse_modalities(self.scp_allow)
            problem = network_bind_problem(self.scp_bind, self.scp_allow, self.scp_accept_any)
        except ModalityError as exc:
            raise ConfigError(str(exc)) from None
        if problem and self.scp_port is not None:
            raise ConfigError(problem)
        if self.scp_max_associations < 1 or not 1 <= self.scp_max_per_host <= self.scp_max_associations:
            raise ConfigError("scp_max_associations must be at least 1 and scp_max_per_host between 1 and it")
        if self.scp_handshake_seconds <= 0 or self.scp_association_seconds < self.scp_handshake_seconds:
            raise ConfigError("scp_handshake_seconds must be positive and scp_association_seconds at least as long")
        if self.scp_port is not None and self.once:
            raise ConfigError("the DICOM receiver (scp_port) runs with the service, not with --once")
        if self.drift_window < 20 or self.drift_site_after < 0:  # drift monitor (issue 23)
            raise ConfigError("drift_window must be at least 20 and drift_site_after not negative")
        for name in ("audit_max_mb", "disk_min_free_mb", "disk_min_free_percent", "retention_received_days",
                     "retention_output_days", "retention_quarantine_days", "retention_log_days",
                     "retention_min_free_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if 0 < self.retention_min_free_mb <= self.disk_min_free_mb:
            raise ConfigError("retention_min_free_mb must be above disk_min_free_mb: retention makes room before "
                              "the disk guard stops work")
        if self.disk_min_free_percent >= 100:
            raise ConfigError("disk_min_free_percent must be below 100")
        if self.health_stale_seconds <= 0:
            raise ConfigError("health_stale_seconds must be positive")
        if self.health_fault_seconds <= 0:
            raise ConfigError("health_fault_seconds must be positive")
        if self.forward_max_attempts < 1:
            raise ConfigError("forward_max_attempts must be at least 1")
        watch = self.watch.resolve()
        for name in ("out", "state"):
            other = getattr(self, name)
            if other is not None and other.resolve() == watch:
                raise ConfigError(f"the {name} folder must not be the watch folder")
        return self


def settings_from_mapping(data: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """Validate and coerce a mapping of setting names (TOML keys or flags) to values."""
    if "edge" in data and isinstance(data["edge"], dict):
        data = {**{k: v for k, v in data.items() if k != "edge"}, **data["edge"]}
    try:
        return schema.coerce_mapping(EdgeConfig, data, base)
    except schema.SettingError as exc:
        raise ConfigError(str(exc)) from None


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file into validated settings (paths resolved against its folder)."""
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    return settings_from_mapping(data, base=Path(path).resolve().parent)


def build_config(file_settings: dict[str, Any], flag_settings: dict[str, Any]) -> EdgeConfig:
    """Defaults, overridden by the config file, overridden by flags (``None`` flags are unset)."""
    merged = {**file_settings, **{k: v for k, v in flag_settings.items() if v is not None}}
    return EdgeConfig(**merged).validate()


def add_run_arguments(parser: Any) -> None:
    """The ``run`` flags, one per setting, grouped by section; every default ``None`` (unset: the file's wins)."""
    for title, about in SECTIONS:  # the sample file's order
        if title == GATE_SECTION:
            add_gate_arguments(parser, unset=True)
            continue
        group = parser.add_argument_group(title.lower(), textwrap.fill(about, 78) if about else None)
        schema.add_arguments(group, EdgeConfig, unset=True,
                             names=[s.name for s in schema.specs(EdgeConfig) if s.meta.section == title])


def flag_settings(args: Any) -> dict[str, Any]:
    """The settings given as ``run`` flags."""
    return schema.set_flags(EdgeConfig, args)


def sample_toml() -> str:
    """The sample config file, ``packaging/lungseg-edge.toml`` (every setting, its explanation and default)."""
    return schema.sample_toml(EdgeConfig, SAMPLE_HEADER, SECTIONS)


def drift(committed: str, parser: Any = None) -> list[str]:
    """Where the committed sample file text, the loader's reading of it, or the ``run`` parser disagree with
    the declaration above (an empty list: none)."""
    try:
        loaded = settings_from_mapping(tomllib.loads(committed))
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        return [f"the sample file does not load: {exc}"]
    return schema.drift(EdgeConfig, committed=committed, expected=sample_toml(), loaded=loaded, parser=parser)
