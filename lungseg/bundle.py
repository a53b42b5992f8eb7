"""Model bundles: a folder holding ``model.onnx`` and its variants, or a single ONNX file.

Layout of a bundle folder (written by ``lungseg-export``)::

    model.onnx          fp32, the reference export
    model.fp16.onnx     fp16 weights, fp32 inputs/outputs (optional)
    model.int8.onnx     static QDQ quantisation for the CPU fallback (optional)
    model.openvino.int8.xml / .bin  NNCF int8 IR for the OpenVINO CPU backend (optional, lungseg-export --openvino)
    model.engine        TensorRT engine (fp16; fp32 where fp16 failed parity), one GPU + TensorRT version (optional)
    engine.json         what the engine was built for (optional)
    parity.json         export-time parity against PyTorch
    golden.npz          self-test set: a few preprocessed radiographs + reference fp32 probabilities
    gate.onnx           image gate: orientation, negative, mirror, chest (optional, see lungseg.gate)
    shape_model.npz     mask shape model of lungseg.plausibility (comes with the gate)
    gate.json           the gate's version, sha256s, parity and held-out accuracy
    bundle.json         sha256 of every file above (written last by ``lungseg-export``)
    MODEL_CARD.md       how the model was trained
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lungseg.models
from lungseg.atomic import TEMP_SUFFIX, atomic_write

ONNX_FP32 = "model.onnx"
ONNX_FP16 = "model.fp16.onnx"
ONNX_INT8 = "model.int8.onnx"
ENGINE_FILE = "model.engine"  # fp16 or fp32 (engine.json says which; an fp16 engine failing parity is rebuilt at fp32)
LEGACY_ENGINE_FILE = "model.fp16.engine"  # what lungseg < 0.3 called it, whatever its precision; still read
ENGINE_MANIFEST = "engine.json"
PARITY = "parity.json"
GOLDEN = "golden.npz"
BUNDLE_MANIFEST = "bundle.json"
GATE_ONNX = "gate.onnx"
GATE_MANIFEST = "gate.json"
SHAPE_MODEL = "shape_model.npz"
INPUT_NAME = "image"
OUTPUT_NAME = "probability"


class ModelNotFoundError(FileNotFoundError):
    """No usable model at the given location (or no shipped default)."""


def default_bundle_dir() -> Path:
    """The shipped default model bundle (inside the installed package)."""
    return Path(lungseg.models.__file__).resolve().parent / "default"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    """A resolved model bundle. ``onnx`` is the file a CPU/CUDA session loads."""

    root: Path
    onnx: Path
    metadata: dict[str, str] = field(default_factory=dict)

    def variant(self, name: str) -> Path | None:
        path = self.root / name
        return path if path.is_file() else None

    @property
    def engine_manifest(self) -> dict[str, Any] | None:
        path = self.variant(ENGINE_MANIFEST)
        return json.loads(path.read_text()) if path else None

    @property
    def manifest(self) -> dict[str, Any]:
        """``bundle.json`` (empty for a bare ONNX file)."""
        path = self.root / BUNDLE_MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def name(self) -> str:
        return str(self.manifest.get("model_name") or self.metadata.get("model_name", self.onnx.stem))

    @property
    def version(self) -> str:
        """The bundle's one model version: ``bundle.json``'s ``model_version``, else the ONNX metadata's."""
        return str(self.manifest.get("model_version") or self.metadata.get("model_version", "unknown"))

    @property
    def sha256(self) -> str:
        """Identity of the whole bundle: sha256 of ``bundle.json``'s file list (every file's sha256 and size),
        canonically serialised; a bare ONNX file: its own sha256. Any file changed, added or removed changes it."""
        files = self.manifest.get("files")
        if not files:
            return sha256_file(self.onnx)
        return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def device_uid(self) -> str:
        """A DICOM UID for this model as a device (Contributing Equipment's Device UID): derived from
        :attr:`sha256`, so it changes whenever the model changes (``2.25.`` + the first 128 bits)."""
        return device_uid(self.sha256)


def device_uid(bundle_sha256: str) -> str:
    """``2.25.<decimal of the first 128 bits of the hash>``: a valid UID of at most 44 characters."""
    return f"2.25.{int(bundle_sha256[:32], 16)}"


def write_bundle_manifest(root: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``bundle.json``: the sha256 and size of every file in ``root``, the fields the manifest already
    had (``model_name``, ``model_version``, ...) and ``extra`` fields (which win)."""
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(root.iterdir()) if p.is_file() and p.name != BUNDLE_MANIFEST
             and not p.name.endswith((".tmp", TEMP_SUFFIX))}
    path = root / BUNDLE_MANIFEST
    kept = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("schema", "files")} \
        if path.is_file() else {}
    manifest = {"schema": "lungseg/bundle/1", "files": files, **kept, **(extra or {})}
    atomic_write(root / BUNDLE_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def verified_file(root: Path, name: str) -> Path:
    """``root/name`` after checking it against ``bundle.json`` (when the bundle has one).

    Raises ``ValueError`` naming the file when it is missing or its sha256 differs.
    """
    path = root / name
    if not path.is_file():
        raise ValueError(f"{name}: not in the bundle {root.name}")
    manifest_path = root / BUNDLE_MANIFEST
    if manifest_path.is_file():
        recorded = json.loads(manifest_path.read_text()).get("files", {}).get(name, {}).get("sha256")
        if recorded is not None and recorded != sha256_file(path):
            raise ValueError(f"{name}: sha256 differs from {BUNDLE_MANIFEST} (file changed after export)")
    return path


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The ONNX ``metadata_props`` (read with onnxruntime, so the runtime needs no ``onnx``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelNotFoundError(f"{path}: not a loadable ONNX model ({exc})") from exc
    meta = session.get_modelmeta()
    return dict(meta.custom_metadata_map)


def resolve_bundle(location: str | Path | None = None, onnx_name: str = ONNX_FP32) -> Bundle:
    """Resolve a bundle folder, an ``.onnx`` file, or ``None`` (the shipped default)."""
    if location is None:
        root = default_bundle_dir()
        if not (root / onnx_name).is_file():
            raise ModelNotFoundError(
                "no shipped default model is installed; pass --model PATH "
                "(a bundle folder from lungseg-export, or an .onnx file)"
            )
        location = root
    path = Path(location)
    if path.is_dir():
        onnx = path / onnx_name
        if not onnx.is_file():
            raise ModelNotFoundError(f"{path}: bundle folder has no {onnx_name}")
        return Bundle(root=path, onnx=onnx, metadata=read_onnx_metadata(onnx))
    if path.is_file():
        return Bundle(root=path.parent, onnx=path, metadata=read_onnx_metadata(path))
    raise ModelNotFoundError(f"{path}: no such model file or bundle folder")
