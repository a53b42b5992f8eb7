"""The stages of the edge pipeline, each a unit with typed input and output.

:class:`~lungseg.edge_runtime.pipeline.Processor` runs them in this order (stage: unit -> output):

``decode``         :meth:`Admission.admit <lungseg.edge_runtime.admission.Admission.admit>` (read,
                   hash, dedupe, decode in the isolated worker) -> :class:`Admitted`
``gate, segment``  :class:`SegmentStage`, :func:`lungseg.gate.gated_segment` on the whole batch (the
                   gate's correction feeds the segmenter: one call) -> a ``Segmentation``, a
                   ``Refused`` or the exception, per file (:data:`SegmentResult`)
``reference``      :func:`reference`: the source data set made fit for the outputs -> :class:`Reference`
``measure / QA``   :func:`measure`: areas and QA at model resolution -> :class:`Measurement`
``render``         :func:`render`: the overlay image and its captions -> :class:`Rendering`
``encode``         :func:`encode_sc`, :func:`encode_seg` -> the SC and SEG data sets
``write``          :func:`write_sc`, :func:`write_seg`: to temp names, each verified -> staged files
``publish``        :func:`sidecar_for` -> :class:`~lungseg.edge_runtime.sidecar.Sidecar`, then
                   :func:`publish`: the sidecar staged last, every output renamed into place ->
                   the published paths; the ledger, :func:`record_metrics` and the log follow

Stages do not catch: the processor decides what a failure means (an input fault is
quarantined, an output fault retried). :class:`StageClock` times the stages from
``reference`` on (the sidecar's ``write_stages_ms``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import logging
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom import dcmread
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset

from lungseg import dicom_out, dicom_results
from lungseg.dicom_out import Provenance
from lungseg.edge_runtime import service_metrics
from lungseg.edge_runtime.admission import Admitted
from lungseg.edge_runtime.codes import QAFlag
from lungseg.edge_runtime.fsio import StagedFiles, write_synced
from lungseg.edge_runtime.overlay import render_overlay, turned_orientation
from lungseg.edge_runtime.sidecar import (
    Areas,
    BackendHealth,
    ModelInfo,
    OutputFile,
    Outputs,
    Rendered,
    Sidecar,
    SourceInfo,
)
from lungseg.gate import GateModel, GatePolicy, Refused, flag_words, gated_segment
from lungseg.gsps import build_gsps
from lungseg.imaging import Radiograph
from lungseg.inference import Segmentation
from lungseg.measurement import MaskMeasurement, measure_mask
from lungseg.plausibility import ShapeModel
from lungseg.postprocess import PostprocessConfig
from lungseg.predictors import Predictor
from lungseg.spacing_check import SpacingCheck

log = logging.getLogger("lungseg.edge")

#: what the gate-and-segment stage gives each radiograph: a segmentation, the gate's refusal, or the
#: exception its inference raised (an exception is only returned when segmenting a batch file by file)
SegmentResult = Segmentation | Refused | BaseException


class StageClock:
    """Times a file's write stages: :meth:`mark` after each, :meth:`stages_ms` the time each took."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._marks: list[tuple[str, float]] = []
        self._overlapped: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        self._marks.append((stage, time.perf_counter()))

    def add(self, stage: str, ms: float) -> None:
        """A stage timed on another thread, overlapping the marked ones (reported, not part of their sum)."""
        self._overlapped[stage] = round(ms, 2)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000

    def stages_ms(self) -> dict[str, float]:
        out, before = {}, self.start
        for stage, at in self._marks:
            out[stage] = round((at - before) * 1000, 2)
            before = at
        return {**out, **self._overlapped}


# --- gate, segment -------------------------------------------------------------------------------------
class SegmentStage:
    """Gate, correct, segment and QA a batch (:func:`lungseg.gate.gated_segment`): one result per radiograph.

    When the batch fails, each file is tried alone so one bad input costs only its own result
    (the exception it raised); a single file's failure is raised.
    """

    def __init__(self, predictor: Predictor, gate: GateModel | None, postprocess: PostprocessConfig,
                 policy: GatePolicy, shape_model: ShapeModel | None):
        self.predictor = predictor
        self.gate = gate
        self.postprocess = postprocess
        self.policy = policy
        self.shape_model = shape_model

    def _gated(self, radiographs: Sequence[Radiograph]) -> list[Segmentation | Refused]:
        return gated_segment(self.predictor, self.gate, radiographs, config=self.postprocess, policy=self.policy,
                             shape_model=self.shape_model)

    def __call__(self, radiographs: Sequence[Radiograph]) -> list[SegmentResult]:
        try:
            return list(self._gated(radiographs))
        except Exception:
            if len(radiographs) == 1:
                raise
            log.exception("batch inference failed; retrying the files one by one")
        results: list[SegmentResult] = []
        for radiograph in radiographs:
            try:
                results.extend(self._gated([radiograph]))
            except Exception as exc:
                results.append(exc)
        return results


# --- reference -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """The source data set as the outputs copy it, and the source attributes left empty or out."""

    dataset: Dataset
    emptied: list[str]


def known_character_set(ds: Dataset) -> bool:
    """Whether every term of (0008,0005) is one pydicom and highdicom know (an absent one is fine)."""
    value = ds.get("SpecificCharacterSet")
    terms = [value] if isinstance(value, str) else list(value or [])
    return all(not str(term).strip() or str(term).strip() in python_encoding for term in terms)


def reference(source: Dataset, name: str) -> Reference:
    """A pixel-free copy of ``source`` valid for the outputs (``name``: the file's reference, for the log)."""
    with warnings.catch_warnings():  # pydicom/highdicom warnings quote patient data
        warnings.simplefilter("ignore")
        ref, emptied = dicom_out.reference_dataset(source)
        if not known_character_set(ref):  # values were decoded with the default; keep them as UTF-8
            ref.SpecificCharacterSet = "ISO_IR 192"
            emptied.append("SpecificCharacterSet")
    if emptied:
        log.warning("source attributes invalid for their VR were left empty or out in the outputs",
                    extra={"event": "source_fixed", "file": name, "attributes": emptied})
    return Reference(ref, emptied)


# --- measure / QA --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """What the outputs say about the mask: areas, QA, and the text drawn and written."""

    areas: Areas
    qa: dict[str, Any]  # "flags", "review", then the gate's and the mask checks' details
    lines: list[str]  # areas (and the QA flags, if any), one line each
    review: list[str]  # the flags that need review, in words
    notes: list[str]  # the corrections applied, in words
    spacing: SpacingCheck  # is the pixel spacing plausible for these lungs (else the areas are unreliable)

    @property
    def flags(self) -> list[str]:
        return self.qa["flags"]


def area_lines(areas: Areas) -> list[str]:
    """The areas as the overlay and the SC's comments give them (per lung, then the total)."""
    cm2 = areas.lung_areas_cm2
    if cm2 is None:
        return ["areas: no usable pixel spacing"]
    return [f"{k.replace('_', ' ')}: {v:.1f} cm2" for k, v in cm2.items() if k != "total"] + [
        f"total: {cm2['total']:.1f} cm2"]


def _is_correction(flag: str) -> bool:
    code = QAFlag.of(flag)
    return code is not None and code.is_correction


def measure(radiograph: Radiograph, segmentation: Segmentation) -> Measurement:
    """Areas and QA (:func:`lungseg.measurement.measure_mask`, as ``lungseg-segment``'s), and their wording."""
    core = measure_mask(radiograph, segmentation)
    areas = Areas(core.areas["lung_area_px"], core.areas.get("lung_area_px_by_lung"), core.areas.get("lung_areas_cm2"))
    qa = core.qa
    lines = area_lines(areas)
    review = [flag_words(f) for f in qa.get("review", qa["flags"])]
    notes = [flag_words(f) for f in qa["flags"] if _is_correction(f)]
    if qa["flags"]:
        lines.append("QA: " + ", ".join(qa["flags"]))
    return Measurement(areas, qa, lines, review, notes, core.spacing)


# --- render --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rendering:
    """The Secondary Capture's image and the words that go with it."""

    rgb: np.ndarray
    review_text: str  # "REVIEW: ..." when a flag needs review, else ""
    comments: str  # the SC's ImageComments
    style: str = "outline"
    text_boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # where the overlay's text went
    strip_rows: int = 0  # rows of the text strip below the image (0: the SC has the image's size)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


#: the smallest long side ``sc_max_side`` may ask for: below it the legend and banner cannot stay whole and off
#: the lungs on a typical chest radiograph (checked by the layout tests at 256, 1024 and 2048 px)
MIN_SC_SIDE = 1024


def sc_pixels(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """The radiograph as the Secondary Capture shows it: reduced by area so its long side is ``<= max_side``
    (never below :data:`MIN_SC_SIDE`; 0: as given)."""
    long_side = max(pixels.shape)
    if max_side <= 0 or long_side <= max(max_side, MIN_SC_SIDE):
        return pixels
    scale = max(max_side, MIN_SC_SIDE) / long_side
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def displayed_orientation(radiograph: Radiograph, segmentation: Segmentation) -> tuple[list[str] | None, str | None]:
    """PatientOrientation that describes the stored pixels, and a note when it is not the header's.

    When the gate found the stored image turned (and corrected it before segmenting), the header's
    orientation describes the upright image, not these pixels: the markers follow the pixels.
    """
    header = radiograph.dataset.get("PatientOrientation") if radiograph.dataset is not None else None
    header = [str(v) for v in header] if header else None
    turns = int(segmentation.qa.get("gate", {}).get("correction", {}).get("quarter_turns", 0) or 0)
    if not turns % 4 or header is None:
        return header, None
    shown = turned_orientation(header, turns)
    written = "\\".join(header)
    return shown, (f"R/L markers follow the image: header orientation {written} does not match "
                   f"the pixels (turned {turns * 90 % 360} deg)")


def render(radiograph: Radiograph, segmentation: Segmentation, measured: Measurement, provenance: Provenance,
           max_side: int, style: str = "outline") -> Rendering:
    """The overlay at full resolution (mask outline, legend, areas, review banner, notes, orientation markers)
    and the SC's comments. The presentation-ready image at native size when the decoder kept it
    (``Radiograph.display``), else the decoded pixels."""
    shown = radiograph.display if radiograph.display is not None else radiograph.pixels
    pixels = sc_pixels(shown, max_side)
    orientation, orientation_note = displayed_orientation(radiograph, segmentation)
    notes = [*measured.notes, *([orientation_note] if orientation_note else [])]
    model = f"model {provenance.model_name} {provenance.model_version} ({provenance.backend})"
    overlay = render_overlay(pixels, segmentation.mask_at(pixels.shape), legend=[model],
                             areas_unreliable=not measured.spacing.areas_reliable and measured.areas.lung_areas_cm2
                             is not None,
                             areas=measured.lines, review=measured.review, notes=notes, style=style,
                             patient_orientation=orientation)
    review = review_text(measured)
    comments = "; ".join([f"{dicom_out.CAPTION}.", *([review] if review else []), *notes, *measured.lines])
    return Rendering(overlay.rgb, review, comments, style, overlay.boxes, overlay.strip_rows)


def review_text(measured: Measurement) -> str:
    """``"REVIEW: flag, ..."`` when a flag needs review, else ``""`` (the SC's banner, the SEG's description)."""
    return "REVIEW: " + ", ".join(measured.review) if measured.review else ""


# --- encode --------------------------------------------------------------------------------------------
def encode_sc(ref: Reference, rendering: Rendering, provenance: Provenance, syntax: str) -> Dataset:
    """The overlay Secondary Capture, in transfer syntax ``syntax``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dicom_out.build_sc(ref.dataset, rendering.rgb, provenance, syntax=syntax, comments=rendering.comments)


def encode_seg(ref: Reference, segmentation: Segmentation, review: str, provenance: Provenance) -> Dataset:
    """The binary Segmentation of the native-size mask (its description says ``review`` when flagged)."""
    return dicom_results.segmentation(ref.dataset, segmentation, review, provenance)


def core_measurement(measured: Measurement) -> MaskMeasurement:
    """The edge's measurement as the core states it (:mod:`lungseg.measurement`)."""
    return MaskMeasurement(measured.areas.to_dict(), measured.qa, measured.spacing)


def encode_sr(ref: Reference, radiograph: Radiograph, measured: Measurement, seg: Dataset,
              provenance: Provenance) -> Dataset:
    """The TID 1500 Measurement Report: the areas and QA of ``seg``'s lung segment, the model as device."""
    return dicom_results.measurement_report(ref.dataset, radiograph, core_measurement(measured), seg, provenance)


def encode_gsps(ref: Reference, radiograph: Radiograph, segmentation: Segmentation, measured: Measurement,
                provenance: Provenance) -> Dataset:
    """The presentation state: the lung contours, areas and review banner over the original image."""
    return build_gsps(ref.dataset, segmentation.mask, measured.lines, review_text(measured), provenance,
                      radiograph.facts)


def write_gsps(staged: StagedFiles, path: Path, gsps: Dataset) -> None:
    """Stage the presentation state, then parse the bytes written back."""
    _write_read_back(staged, path, gsps, "GraphicAnnotationSequence", "presentation state")


# --- write ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputPaths:
    """``<out>/<StudyInstanceUID>/<source SOPInstanceUID>.{sc.dcm,seg.dcm,sr.dcm,json}`` (``None``: not written)."""

    sc: Path | None
    sidecar: Path
    seg: Path | None = None
    sr: Path | None = None
    gsps: Path | None = None


def output_paths(out: Path, study_uid: str, source_sop_uid: str, seg: bool, sr: bool = False,
                 sc: bool = True, gsps: bool = False) -> OutputPaths:
    """Where one file's outputs go; the SR only beside a SEG (it references the SEG's segment)."""
    folder = out / study_uid
    return OutputPaths(sc=folder / f"{source_sop_uid}.sc.dcm" if sc else None,
                       sidecar=folder / f"{source_sop_uid}.json",
                       seg=folder / f"{source_sop_uid}.seg.dcm" if seg else None,
                       sr=folder / f"{source_sop_uid}.sr.dcm" if seg and sr else None,
                       gsps=folder / f"{source_sop_uid}.pr.dcm" if gsps else None)


def write_sc(staged: StagedFiles, path: Path, sc: Dataset, rgb: np.ndarray, *, decode: bool,
             clock: StageClock) -> None:
    """Stage the SC (every byte written and fsynced, or it raises), then verify the bytes written."""
    tmp = staged.stage(path)
    _write_sc_to(tmp, sc, rgb, decode=decode, clock=clock)
    staged.mark_synced(tmp)


def _write_sc_to(tmp: Path, sc: Dataset, rgb: np.ndarray, *, decode: bool, clock: StageClock) -> None:
    """Write and fsync the SC's bytes to ``tmp`` (``sc_save``), then verify the bytes written (``sc_verify``)."""
    encoded = io.BytesIO()  # one write and one fsync instead of many small writes
    sc.save_as(encoded, enforce_file_format=True)
    write_synced(tmp, encoded.getbuffer())
    clock.mark("sc_save")
    encoded.seek(0)  # the bytes just written: reading the file back would read them from the page cache
    dicom_out.verify_sc(encoded, rgb, decode=decode)
    clock.mark("sc_verify")


class BackgroundSc:
    """The overlay SC encoded, written and verified on a thread of its own (:func:`encode_sc`, then
    :func:`write_sc`'s stages) while the calling thread encodes and writes the SEG and SR: the SC's
    megabytes are copied, written and fsynced with the GIL released, so on two cores that runs beside
    the SEG and SR encoding instead of before it. (The overlay is drawn before, on the calling thread:
    its many short OpenCV calls would each wait for the GIL here.) The SC is staged first, from the
    calling thread (the order of the outputs is kept); the thread encodes from its own copy of the
    reference data set (the SEG and SR read the original meanwhile). :meth:`wait` joins, re-raises the
    thread's error and returns the SC data set."""

    def __init__(self, staged: StagedFiles, path: Path, ref: Reference, rendering: Rendering,
                 provenance: Provenance, *, syntax: str, decode: bool) -> None:
        self._staged, self._tmp = staged, staged.stage(path)
        self._error: BaseException | None = None
        self._sc: Dataset | None = None
        self._clock = StageClock()
        own = Reference(copy.deepcopy(ref.dataset), list(ref.emptied))

        def run() -> None:
            try:
                sc = encode_sc(own, rendering, provenance, syntax)
                self._clock.mark("sc_encode")
                _write_sc_to(self._tmp, sc, rendering.rgb, decode=decode, clock=self._clock)
                self._sc = sc
            except BaseException as exc:  # re-raised in the calling thread by wait()
                self._error = exc

        self._thread = threading.Thread(target=run, name="lungseg-sc", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for the thread without raising (before the staged files are discarded)."""
        self._thread.join()

    def wait(self, clock: StageClock) -> Dataset:
        """Join; re-raise the thread's error; report its stages (``sc_encode``, ``sc_save``, ``sc_verify``,
        overlapping the calling thread's) in ``clock``, then ``sc_wait``; the SC data set."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._sc is not None
        self._staged.mark_synced(self._tmp)
        for stage, ms in self._clock.stages_ms().items():
            clock.add(stage, ms)
        clock.mark("sc_wait")
        return self._sc


def write_sr(staged: StagedFiles, path: Path, sr: Dataset) -> None:
    """Stage the SR, then parse the bytes written back (a report that does not parse is never published)."""
    _write_read_back(staged, path, sr, "ContentSequence", "SR")


def _write_read_back(staged: StagedFiles, path: Path, ds: Dataset, keyword: str, what: str) -> None:
    """Stage ``ds`` at ``path`` (written and fsynced), then parse the bytes written: same instance, ``keyword``."""
    encoded = io.BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    staged.write(path, encoded.getbuffer())
    encoded.seek(0)
    back = dcmread(encoded)
    if back.SOPInstanceUID != ds.SOPInstanceUID or keyword not in back:
        raise dicom_out.OutputVerificationError(f"{path.name}: the {what} written does not read back")


def write_seg(staged: StagedFiles, path: Path, seg: Dataset, mask: np.ndarray) -> None:
    """Stage the SEG, read it back and decode it: its frame must be the mask."""
    tmp_seg = staged.stage(path)
    seg.save_as(tmp_seg, enforce_file_format=True)
    dicom_out.verify_seg(tmp_seg, mask)


# --- publish -------------------------------------------------------------------------------------------
def decode_parts(decode_ms: float, worker_ms: float | None) -> dict[str, float]:
    """The decode stage split into the isolated worker's own time and the hand-over around it."""
    if worker_ms is None:
        return {"in_process": round(decode_ms, 2)}
    return {"worker": round(float(worker_ms), 2), "transfer": round(max(0.0, decode_ms - float(worker_ms)), 2)}


def file_timings(decode_ms: float, segment_ms: dict[str, float], write_ms: float) -> dict[str, float]:
    """Per-stage times of one file (decode, the segmentation's stages, write) and their total."""
    timings = {"decode": round(decode_ms, 2), **{k: round(v, 2) for k, v in segment_ms.items()},
               "write": round(write_ms, 2)}
    timings["total"] = round(sum(timings.values()), 2)
    return timings


@dataclass(frozen=True)
class Serving:
    """What served a file: provenance, why better backends were not used, and the backend's health."""

    provenance: Provenance
    fallbacks: list[str]
    health: BackendHealth | None = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sidecar_for(item: Admitted, ref: Reference, measured: Measurement, rendering: Rendering | None,
                sc: Dataset | None, seg: Dataset | None, paths: OutputPaths, serving: Serving, *,
                timings_ms: dict[str, float], write_stages_ms: dict[str, float], batch_size: int,
                sr: Dataset | None = None, gsps: Dataset | None = None) -> Sidecar:
    """The sidecar of one file's outputs."""
    radiograph, ds, prov = item.radiograph, item.dataset, serving.provenance
    spacing = radiograph.pixel_spacing_mm
    source = SourceInfo(
        file=item.name, file_ref=item.key, sha256=item.sha256, sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID), study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID), modality=str(ds.get("Modality", "")),
        rows=radiograph.source_shape[0], columns=radiograph.source_shape[1], attributes_emptied_in_outputs=ref.emptied)
    outputs = Outputs(
        OutputFile(paths.sc.name, str(sc.SOPInstanceUID), str(sc.SeriesInstanceUID),
                   transfer_syntax=sc.file_meta.TransferSyntaxUID.name)
        if sc is not None and paths.sc is not None else None,
        OutputFile(paths.seg.name, str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID))
        if seg is not None and paths.seg is not None else None,
        OutputFile(paths.sr.name, str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID))
        if sr is not None and paths.sr is not None else None,
        OutputFile(paths.gsps.name, str(gsps.SOPInstanceUID), str(gsps.SeriesInstanceUID))
        if gsps is not None and paths.gsps is not None else None)
    rendered = Rendered(rows=int(radiograph.pixels.shape[0]), columns=int(radiograph.pixels.shape[1]),
                        decoded_level=radiograph.facts.get("decoded_level", 0),
                        pixel_decoder=radiograph.facts.get("pixel_decoder"))
    if rendering is not None:
        rendered = dataclasses.replace(rendered, sc_rows=rendering.shape[0], sc_columns=rendering.shape[1],
                                       style=rendering.style,
                                       text_boxes={k: list(v) for k, v in rendering.text_boxes.items()},
                                       text_strip_rows=rendering.strip_rows)
    return Sidecar(
        disclaimer=dicom_out.CAPTION, processed_at=_now(), source=source, outputs=outputs,
        pixel_spacing_mm=list(spacing) if spacing else None, rendered=rendered, areas=measured.areas, qa=measured.qa,
        timings_ms=timings_ms, write_stages_ms=write_stages_ms,
        decode_parts_ms=decode_parts(item.decode_ms, radiograph.facts.get("decode_ms_worker")),
        backend=prov.backend, precision=prov.precision, fallbacks=serving.fallbacks, backend_health=serving.health,
        batch_size=batch_size,
        model=ModelInfo(name=prov.model_name, version=prov.model_version, file=prov.model_file,
                        sha256=prov.model_sha256, threshold=prov.threshold, bundle_sha256=prov.bundle_sha256,
                        device_uid=prov.device_uid),
        software_version=prov.software_version)


def publish(staged: StagedFiles, paths: OutputPaths, sidecar: Sidecar) -> list[Path]:
    """Stage the sidecar last, then rename every staged output into place and fsync the folder."""
    staged.write(paths.sidecar, sidecar.to_json())
    return staged.publish()


def record_metrics(timings_ms: dict[str, float], flags: list[str]) -> None:
    """One processed file: stage latencies, QA flags, last success (no-ops while metrics are off)."""
    for stage, ms in timings_ms.items():
        if stage != "total":
            service_metrics.observe_stage(stage, ms / 1000.0)
    for flag in flags:
        service_metrics.count("flagged", flag=flag)
    if flags:
        service_metrics.count("flagged_files")
    service_metrics.count("processed")
    service_metrics.processed_ok()
