"""Model identity: the one name, version and Device UID every output of a bundle carries.

:class:`ModelIdentity` is built once from a resolved bundle (:func:`lungseg.bundle.resolve_bundle`)
and names, in every output (overlay legend, sidecar, SEG, SC, SR), the same model:

* ``model_version``: ``bundle.json``'s ``model_version`` field when present, else the ONNX metadata's
  ``model_version`` (the key :data:`VERSION_FIELD` in both places; bundle.json wins), else ``"unknown"``;
  ``version_source`` says which one it came from.
* ``bundle_sha256``: :attr:`lungseg.bundle.Bundle.sha256`, the sha256 of ``bundle.json``'s file list (each
  file's sha256 and size, canonical JSON), so any file changed, added or removed changes it, while the
  descriptive fields of ``bundle.json`` (version, notes) do not; a bare ONNX file: its own sha256.
* ``device_uid``: :func:`lungseg.bundle.device_uid` of ``bundle_sha256``: ``2.25.`` followed by the decimal
  value of its first 128 bits (a UUID-derived UID, PS3.5 B.2; at most 44 characters). The same bundle always
  gives the same UID, any other bundle a different one: the Device UID that IHE AI Results (AIR) expects
  in the Contributing Equipment to change whenever the model changes.

:meth:`ModelIdentity.contributing_equipment` gives the Contributing Equipment item for DICOM outputs,
:meth:`ModelIdentity.sr_algorithm` the SR's TID 4019 Algorithm Identification and
:meth:`ModelIdentity.seg_algorithm` the SEG's Algorithm Identification Sequence.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import lungseg
from lungseg.bundle import BUNDLE_MANIFEST, ONNX_FP32, Bundle, device_uid, resolve_bundle, sha256_file
from lungseg.errors import LungsegError

VERSION_FIELD = "model_version"  # bundle.json field (wins), then the ONNX metadata key of the same name
NAME_FIELD = "model_name"
MANUFACTURER = "lungseg"
CAPTION = "research use - not for diagnosis"
#: Purpose of Reference of the model's Contributing Equipment item. DICOM has no "Processing Algorithm"
#: purpose: CID 7005 offers (109102, DCM, "Processing Equipment") for equipment that processed the data.
PURPOSE_OF_REFERENCE: Code = codes.DCM.ProcessingEquipment
UID_NAMESPACE = uuid.UUID("6f1c3c1e-2f0b-5c55-9a43-6c756e677365")  # lungseg's derived UIDs (as the edge's)


class ProvenanceError(LungsegError, ValueError):
    """The bundle does not describe itself consistently (a file differs from ``bundle.json``)."""


def derived_uid(source_uid: str, kind: str) -> str:
    """``2.25.<uuid5>`` of a source UID and a purpose: the same inputs always give the same UID (as the edge's
    outputs derive theirs, so reprocessing a file rewrites the same instance)."""
    return "2.25." + str(uuid.uuid5(UID_NAMESPACE, f"{source_uid}|lungseg-{kind}").int)


@dataclass(frozen=True)
class ModelIdentity:
    """What produced an output: the bundle's model, the lungseg software, and how it was run."""

    model_name: str
    model_version: str
    version_source: str  # "bundle.json", "onnx metadata" or "unknown"
    bundle_sha256: str
    model_file: str  # the ONNX file's name (in the bundle)
    model_sha256: str  # that file's sha256
    device_uid: str  # derived from bundle_sha256 (see the module's docstring)
    software_version: str = lungseg.__version__
    backend: str = ""  # as the caller ran it: "cpu", "cuda", "tensorrt"...
    precision: str = ""  # "fp32", "fp16", "int8"
    threshold: float | None = None
    manufacturer: str = MANUFACTURER

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, backend: str = "", precision: str = "",
                    threshold: float | None = None) -> ModelIdentity:
        """The identity of ``bundle`` (its ONNX file hashed now; raises :class:`ProvenanceError` when
        ``bundle.json`` records another sha256 for it)."""
        manifest = _manifest(bundle)
        version, source = _lookup(VERSION_FIELD, manifest, bundle.metadata)
        name = _lookup(NAME_FIELD, manifest, bundle.metadata)[0] or bundle.onnx.stem
        model_sha256 = sha256_file(bundle.onnx)
        recorded = manifest.get("files", {}).get(bundle.onnx.name, {}).get("sha256")
        if recorded not in (None, model_sha256):
            raise ProvenanceError(f"{bundle.onnx.name}: sha256 differs from {BUNDLE_MANIFEST} "
                                  "(file changed after export)")
        bundle_sha256 = bundle.sha256
        return cls(model_name=name, model_version=version or "unknown", version_source=source,
                   bundle_sha256=bundle_sha256, model_file=bundle.onnx.name, model_sha256=model_sha256,
                   device_uid=device_uid(bundle_sha256), backend=backend, precision=precision, threshold=threshold)

    def with_runtime(self, *, backend: str, precision: str, threshold: float | None = None) -> ModelIdentity:
        """The same model as run by another backend or precision (the Device UID stays: same bundle)."""
        return dataclasses.replace(self, backend=backend, precision=precision,
                                   threshold=self.threshold if threshold is None else threshold)

    @property
    def label(self) -> str:
        """``"<model name> <model version>"``: what the legend, SoftwareVersions and the SR name the model."""
        return f"{self.model_name} {self.model_version}"

    def description(self) -> str:
        """One sentence naming everything that produced an output (Contribution/Derivation Description)."""
        run = ", ".join(p for p in (f"backend {self.backend}" if self.backend else "",
                                    f"precision {self.precision}" if self.precision else "",
                                    f"threshold {self.threshold:g}" if self.threshold is not None else "") if p)
        return (f"Lung segmentation by lungseg {self.software_version}: model {self.label} ({self.model_file}, "
                f"sha256 {self.model_sha256}, bundle sha256 {self.bundle_sha256}, device UID {self.device_uid})"
                f"{', ' + run if run else ''}. {CAPTION}.")

    def contributing_equipment(self, *, application: str = MANUFACTURER, purpose: Code = PURPOSE_OF_REFERENCE,
                               when: datetime.datetime | None = None) -> hd.ContributingEquipment:
        """The Contributing Equipment Sequence item naming the model as a device: Manufacturer, Manufacturer's
        Model Name ``"<application> <model name>"``, Software Versions (lungseg's, then :attr:`label`), Device UID,
        contribution time (``when``, default now) and :meth:`description`."""
        item = hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=purpose,
            manufacturer_model_name=f"{application} {self.model_name}"[:64],
            software_versions=[self.software_version[:64], self.label[:64]],
            contribution_datetime=when or datetime.datetime.now(),
            contribution_description=self.description()[:1024],
        )
        item.DeviceUID = self.device_uid
        return item

    def algorithm_parameters(self) -> dict[str, str]:
        """The parameters the algorithm identifications list (hashes, Device UID, how it was run)."""
        params = {"bundle_sha256": self.bundle_sha256, "model_file": self.model_file,
                  "model_sha256": self.model_sha256, "device_uid": self.device_uid,
                  "software_version": self.software_version, "backend": self.backend, "precision": self.precision,
                  "threshold": f"{self.threshold:g}" if self.threshold is not None else ""}
        return {k: v for k, v in params.items() if v}

    def sr_algorithm(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification: name, version, the parameters as ``key=value`` texts."""
        return hd.sr.AlgorithmIdentification(
            name=self.model_name[:64], version=self.model_version[:64],
            parameters=[f"{k}={v}" for k, v in self.algorithm_parameters().items()])

    def seg_algorithm(self) -> hd.AlgorithmIdentificationSequence:
        """The SEG segment's Algorithm Identification Sequence (family: Artificial Intelligence)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.model_name[:64], family=codes.cid7162.ArtificialIntelligence,
            version=self.model_version[:64], source=self.manufacturer, parameters=self.algorithm_parameters())

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (for a sidecar)."""
        return dataclasses.asdict(self)


def model_identity(location: str | Path | None = None, *, onnx_name: str = ONNX_FP32, backend: str = "",
                   precision: str = "", threshold: float | None = None) -> ModelIdentity:
    """:meth:`ModelIdentity.from_bundle` of :func:`lungseg.bundle.resolve_bundle` ``(location, onnx_name)``."""
    return ModelIdentity.from_bundle(resolve_bundle(location, onnx_name), backend=backend, precision=precision,
                                     threshold=threshold)


def _manifest(bundle: Bundle) -> dict[str, Any]:
    path = bundle.root / BUNDLE_MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProvenanceError(f"{BUNDLE_MANIFEST}: unreadable ({exc})") from exc
    return manifest if isinstance(manifest, dict) else {}


def _lookup(key: str, manifest: dict[str, Any], metadata: dict[str, str]) -> tuple[str, str]:
    """``(value, where)``: ``bundle.json`` first, then the ONNX metadata; ``("", "unknown")`` in neither."""
    if str(manifest.get(key) or "").strip():
        return str(manifest[key]).strip(), "bundle.json"
    if str(metadata.get(key) or "").strip():
        return str(metadata[key]).strip(), "onnx metadata"
    return "", "unknown"


__all__ = ["MANUFACTURER", "PURPOSE_OF_REFERENCE", "VERSION_FIELD", "ModelIdentity", "ProvenanceError",
           "derived_uid", "model_identity"]
