"""The JSON sidecar written beside each input's outputs: a typed, versioned contract.

``<out>/<StudyInstanceUID>/<source SOPInstanceUID>.json`` is read by other programs, so its
layout is fixed by :data:`SCHEMA_ID` (the document's ``schema`` field) and described by a
JSON Schema shipped beside this module (``sidecar.schema.json``, :func:`json_schema`). Any
change to the layout is a new schema version: a new :data:`SCHEMA_ID` and a new schema file.

:class:`Sidecar` is built by :func:`lungseg.edge_runtime.stages.sidecar_for` and serialised
by :meth:`Sidecar.to_json`, whose keys come in the documented order. The QA section is
open (the gate's and the mask checks' details) except for its ``flags`` and ``review`` lists.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_ID = "lungseg-edge/sidecar/2"  # 2: spacing check, SR output, model bundle/device, overlay layout
SCHEMA_FILE = Path(__file__).with_name("sidecar.schema.json")


@dataclass(frozen=True)
class SourceInfo:
    """The input the outputs were derived from (``file`` and ``file_ref`` are keyed references, never names)."""

    file: str
    file_ref: str
    sha256: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    rows: int
    columns: int
    attributes_emptied_in_outputs: list[str]


@dataclass(frozen=True)
class OutputFile:
    """One DICOM output: its file name (in the study folder) and UIDs."""

    file: str
    sop_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str | None = None  # the Secondary Capture's only

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "sop_instance_uid": self.sop_instance_uid,
                               "series_instance_uid": self.series_instance_uid}
        if self.transfer_syntax is not None:
            out["transfer_syntax"] = self.transfer_syntax
        return out


@dataclass(frozen=True)
class Outputs:
    secondary_capture: OutputFile | None  # None with sc = false
    segmentation: OutputFile | None = None
    structured_report: OutputFile | None = None  # the TID 1500 Measurement Report
    presentation_state: OutputFile | None = None  # the GSPS (gsps = true)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        if self.secondary_capture is not None:
            out["secondary_capture"] = self.secondary_capture.to_dict()
        if self.segmentation is not None:
            out["segmentation"] = self.segmentation.to_dict()
        if self.structured_report is not None:
            out["structured_report"] = self.structured_report.to_dict()
        if self.presentation_state is not None:
            out["presentation_state"] = self.presentation_state.to_dict()
        return out


@dataclass(frozen=True)
class Rendered:
    """The decoded image's size, the Secondary Capture's, and the reduced-resolution level decoded."""

    rows: int
    columns: int
    decoded_level: int
    pixel_decoder: str | None = None  # "pydicom" (the CPU decoders) or "nvimgcodec <version>" (gpu_decode)
    # the overlay SC's (absent from the document with sc = false)
    sc_rows: int | None = None
    sc_columns: int | None = None
    style: str | None = None  # the overlay's: "outline" or "filled-outline"
    text_boxes: dict[str, list[int]] | None = None  # where the overlay's text went: [x0, y0, x1, y1] in SC pixels
    text_strip_rows: int | None = None  # rows added below the image for text the lungs left no room for (usually 0)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Areas:
    """Lung areas: in native pixels always, in cm² only with a usable pixel spacing.

    Per-lung keys name the lung (``right_lung``, ``left_lung``) where PatientOrientation
    allows, else the image side (``image_left_lung``, ``image_right_lung``).
    """

    lung_area_px: int
    lung_area_px_by_lung: dict[str, int] | None = None
    lung_areas_cm2: dict[str, float] | None = None  # "total" first, then per lung

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lung_area_px": self.lung_area_px}
        if self.lung_area_px_by_lung is not None:
            out["lung_area_px_by_lung"] = self.lung_area_px_by_lung
        if self.lung_areas_cm2 is not None:
            out["lung_areas_cm2"] = self.lung_areas_cm2
        return out


@dataclass(frozen=True)
class BackendHealth:
    """The serving backend's self-test and its demotions since start (absent for a plain predictor)."""

    selftest: dict[str, Any]
    demotions: list[dict[str, Any]]
    # how the serving backend was chosen (lungseg.predictors.FallbackPredictor.choice) and the device it runs on
    backend_choice: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str  # the bundle's one version (bundle.json's model_version)
    file: str
    sha256: str  # the model file that ran
    threshold: float
    bundle_sha256: str  # the whole bundle (every file): lungseg.bundle.Bundle.sha256
    device_uid: str  # the DICOM outputs' Contributing Equipment Device UID, derived from bundle_sha256


@dataclass(frozen=True)
class Sidecar:
    """One sidecar document (:data:`SCHEMA_ID`)."""

    disclaimer: str
    processed_at: str
    source: SourceInfo
    outputs: Outputs
    pixel_spacing_mm: list[float] | None
    rendered: Rendered
    areas: Areas
    qa: dict[str, Any]  # "flags" and "review" (lists of flag codes), then the gate's and the mask checks' details
    timings_ms: dict[str, float]
    write_stages_ms: dict[str, float]
    decode_parts_ms: dict[str, float]
    backend: str
    precision: str
    fallbacks: list[str]
    backend_health: BackendHealth | None
    batch_size: int
    model: ModelInfo
    software_version: str
    schema: str = SCHEMA_ID

    def to_dict(self) -> dict[str, Any]:
        """The document, keys in the documented order."""
        health = dataclasses.asdict(self.backend_health) if self.backend_health is not None else {}
        return {
            "schema": self.schema,
            "disclaimer": self.disclaimer,
            "processed_at": self.processed_at,
            "source": dataclasses.asdict(self.source),
            "outputs": self.outputs.to_dict(),
            "pixel_spacing_mm": self.pixel_spacing_mm,
            "rendered": self.rendered.to_dict(),
            **self.areas.to_dict(),
            "qa": self.qa,
            "timings_ms": self.timings_ms,
            "write_stages_ms": self.write_stages_ms,
            "decode_parts_ms": self.decode_parts_ms,
            "backend": self.backend,
            "precision": self.precision,
            "fallbacks": self.fallbacks,
            **health,
            "batch_size": self.batch_size,
            "model": dataclasses.asdict(self.model),
            "software": {"lungseg": self.software_version},
        }

    def to_json(self) -> bytes:
        """The bytes written: indented UTF-8 JSON and a final newline."""
        return (json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n").encode()


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of :data:`SCHEMA_ID` documents, as shipped in the package."""
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


__all__ = ["SCHEMA_ID", "Areas", "BackendHealth", "ModelInfo", "OutputFile", "Outputs", "Rendered", "Sidecar",
           "SourceInfo", "json_schema"]
