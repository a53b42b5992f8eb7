"""The work done on a batch of ready files: admit, decode, segment, write, record.

Per file, in order:

1. *admit*   read the file without following links, hash the content (or take the
             hash the ledger cached for this path, size, mtime, ctime and inode);
             skip content the ledger already knows (:mod:`~lungseg.edge_runtime.admission`).
2. *decode*  :func:`lungseg.dicom_decode.read_dicom` in an isolated worker process
             (:mod:`~lungseg.edge_runtime.isolate`); what it refuses (and anything
             else unreadable) goes to quarantine with its reason code.
3. *dedupe*  a SOPInstanceUID that already has outputs is recorded as a duplicate.
4. *segment* one :func:`lungseg.inference.segment_batch` call for the whole batch.
5. *write*   overlay SC, optional SEG and the JSON sidecar, all to temp names;
             both DICOM files are checked (the SC's bytes as written parsed and its
             pixel bytes compared, or decoded with ``sc_verify = "decode"``; the SEG
             read back and decoded);
             areas and QA come from the model-resolution mask; then all are renamed
             into place, the folder is fsynced, and only then is the ledger
             committed. An interrupted write leaves no output and no ledger row,
             so the file is simply processed again after a restart.

Faults are classified: whatever comes from the input (including a value that makes
output building fail) is quarantined; only real output faults (disk full, permission,
read-only, I/O), ledger errors and ``MemoryError`` are retried, with backoff.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import sqlite3
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.edge_runtime import metrics
from lungseg.edge_runtime.admission import PASSTHROUGH, Admission, describe
from lungseg.edge_runtime.admission import Admitted as _Admitted
from lungseg.edge_runtime.admission import Outcome as Outcome
from lungseg.edge_runtime.config import EdgeConfig
from lungseg.edge_runtime.fsio import StagedFiles, is_output_fault
from lungseg.edge_runtime.ledger import Ledger
from lungseg.edge_runtime.logs import uid_ref
from lungseg.edge_runtime.quarantine import Quarantine
from lungseg.gate import CORRECTION_PREFIXES, Refused, flag_words

log = logging.getLogger("lungseg.edge")

SIDECAR_SCHEMA = "lungseg-edge/sidecar/1"


def software_version() -> str:
    try:
        from importlib.metadata import version

        return version("lungseg")
    except Exception:
        import lungseg

        return getattr(lungseg, "__version__", "unknown")


def _allocation_failure(exc: BaseException) -> bool:
    """An inference runtime that could not allocate (onnxruntime raises ``Fail``/``RuntimeException``)."""
    text = str(exc).lower()
    return "bad_alloc" in text or "failed to allocate" in text or "out of memory" in text


def known_character_set(ds: Any) -> bool:
    """Whether every term of (0008,0005) is one pydicom and highdicom know (an absent one is fine)."""
    from pydicom.charset import python_encoding

    value = ds.get("SpecificCharacterSet")
    terms = [value] if isinstance(value, str) else list(value or [])
    return all(not str(term).strip() or str(term).strip() in python_encoding for term in terms)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def output_paths(out: Path, study_uid: str, source_sop_uid: str, seg: bool) -> dict[str, Path]:
    """``<out>/<StudyInstanceUID>/<source SOPInstanceUID>.{sc.dcm,seg.dcm,json}``."""
    folder = out / study_uid
    paths = {"sc": folder / f"{source_sop_uid}.sc.dcm", "sidecar": folder / f"{source_sop_uid}.json"}
    if seg:
        paths["seg"] = folder / f"{source_sop_uid}.seg.dcm"
    return paths


def area_report(mask: np.ndarray, spacing_mm: tuple[float, float] | None,
                patient_orientation: Any, native_pixels_per_pixel: tuple[float, float] = (1.0, 1.0)) -> dict[str, Any]:
    """Areas in (native) pixels always, in cm² (total and per lung) only when the spacing is usable.

    ``mask`` may be the model-resolution mask: see :func:`lungseg.inference.lung_areas`.
    """
    from lungseg.edge_runtime.overlay import side_names
    from lungseg.inference import lung_areas

    areas = lung_areas(mask, spacing_mm, native_pixels_per_pixel)
    left_name, right_name = side_names(patient_orientation)
    keys = {"image_left": left_name.replace(" ", "_").replace("-", "_"),
            "image_right": right_name.replace(" ", "_").replace("-", "_")}
    report: dict[str, Any] = {"lung_area_px": areas["lung_area_px"]}
    if "lung_area_px_by_side" in areas:
        report["lung_area_px_by_lung"] = {keys[k]: v for k, v in areas["lung_area_px_by_side"].items()}
    if "lung_area_mm2" in areas:
        cm2 = {"total": round(areas["lung_area_mm2"] / 100.0, 2)}
        for side, mm2 in areas.get("lung_area_mm2_by_side", {}).items():
            cm2[keys[side]] = round(mm2 / 100.0, 2)
        report["lung_areas_cm2"] = cm2
    return report


def sc_pixels(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """The radiograph as the Secondary Capture shows it: reduced by area so its long side is ``<= max_side``."""
    import cv2

    long_side = max(pixels.shape)
    if max_side <= 0 or long_side <= max_side:
        return pixels
    scale = max_side / long_side
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def qa_report(mask: np.ndarray, raw_qa: dict[str, Any]) -> dict[str, Any]:
    """The QA of a segmentation: the gated path's (``raw_qa`` with flags) or the core mask checks."""
    if "flags" in raw_qa:
        return dict(raw_qa)
    from lungseg.plausibility import mask_qa

    qa = mask_qa(mask)
    return {**qa, "review": list(qa["flags"]), **raw_qa}


def decode_parts(decode_ms: float, worker_ms: float | None) -> dict[str, float]:
    """The decode stage split into the isolated worker's own time and the hand-over around it."""
    if worker_ms is None:
        return {"in_process": round(decode_ms, 2)}
    return {"worker": round(float(worker_ms), 2), "transfer": round(max(0.0, decode_ms - float(worker_ms)), 2)}


def _record_metrics(timings_ms: dict[str, float], flags: list[str]) -> None:
    """One processed file: stage latencies, QA flags, last success (no-ops while metrics are off)."""
    for stage, ms in timings_ms.items():
        if stage != "total":
            metrics.observe_stage(stage, ms / 1000.0)
    for flag in flags:
        metrics.count("flagged", flag=flag)
    if flags:
        metrics.count("flagged_files")
    metrics.count("processed")
    metrics.processed_ok()


class Processor:
    """Turns batches of ready files into outputs; owns the predictor, ledger and quarantine."""

    def __init__(self, config: EdgeConfig, predictor: Any, bundle: Any, ledger: Ledger,
                 stop: threading.Event | None = None, fallbacks: list[str] | None = None):
        from lungseg.bundle import sha256_file
        from lungseg.edge_runtime.dicom_out import Provenance
        from lungseg.postprocess import PostprocessConfig

        self.config = config
        self.predictor = predictor
        self.bundle = bundle
        self.ledger = ledger
        self.stop = stop or threading.Event()
        self.fallbacks = list(fallbacks or [])
        self.out = Path(config.out)
        self.watch = Path(config.watch).resolve()
        threshold = config.threshold if config.threshold is not None else float(
            bundle.metadata.get("threshold", 0.5))
        self.postprocess = PostprocessConfig(threshold=threshold, resolution=config.postprocess_resolution)
        model_file = Path(getattr(predictor, "model_path", bundle.onnx))
        self.provenance = Provenance(
            model_name=bundle.name, model_version=bundle.version,
            model_sha256=sha256_file(model_file), model_file=model_file.name,
            backend=predictor.backend, precision=predictor.precision,
            software_version=software_version(), threshold=threshold,
        )
        self.quarantine = Quarantine(config.quarantine_dir, config.quarantine_mode, ledger)
        from lungseg.gate import load_gate
        from lungseg.plausibility import load_shape_model

        self.gate_policy = config.gate_policy()
        root = getattr(bundle, "root", None)
        self.gate = load_gate(root) if self.gate_policy.mode != "off" else None
        self.shape_model = load_shape_model(root)
        self.admission = Admission(config, ledger, self.quarantine, self.watch)
        if hasattr(predictor, "on_change"):  # lungseg.predictors.FallbackPredictor: demotes on backend errors
            predictor.on_change(self._backend_changed)
            self._backend_changed(predictor)

    def _backend_changed(self, predictor: Any) -> None:
        """After start-up and every demotion: new provenance, ``<state>/backend.json``, metrics."""
        import dataclasses

        from lungseg.bundle import sha256_file
        from lungseg.edge_runtime.backend_status import report_backend_to_metrics, write_backend_status

        model_file = Path(predictor.model_path)
        sha = (self.provenance.model_sha256 if model_file.name == self.provenance.model_file  # hashed at start
               else sha256_file(model_file))
        self.provenance = dataclasses.replace(
            self.provenance, backend=predictor.backend, precision=predictor.precision,
            model_file=model_file.name, model_sha256=sha)
        status = predictor.status()
        write_backend_status(self.config.state_dir, status)
        report_backend_to_metrics(status)

    def backend_summary(self) -> dict[str, Any]:
        """Self-test and demotions of the serving backend, for the sidecar."""
        status = getattr(self.predictor, "status", None)
        if not callable(status):
            return {}
        current = status()
        selftest = current.get("selftest") or {}
        return {"selftest": {k: selftest.get(k) for k in ("passed", "dice_mean", "dice_min", "n_images", "reason")},
                "demotions": current.get("demotions", [])}

    # --- helpers -------------------------------------------------------------
    def close(self) -> None:
        """Stop the decode worker."""
        self.admission.close()

    def _name(self, path: Path) -> str:
        return self.admission.label(path)

    def _retry(self, path: Path, code: str, what: str, exc: BaseException) -> Outcome:
        return self.admission.retry(path, code, what, exc)

    def _quarantine(self, item: _Admitted, code: str, message: str) -> Outcome:
        return self.admission.quarantine(item.path, item.key, item.sha256, item.size, code, message, item.data)

    # --- stage 1-3 -----------------------------------------------------------
    def _admit(self, path: Path, batch_uids: set[str], batch_shas: set[str],
               first: bool = True) -> tuple[_Admitted | None, Outcome | None]:
        return self.admission.admit(path, batch_uids, batch_shas, first)

    # --- stage 4 -------------------------------------------------------------
    def _segment(self, admitted: list[_Admitted]) -> list[Any]:
        """:func:`lungseg.gate.gated_segment` per batch: a Segmentation or a Refused per file."""
        from functools import partial

        from lungseg.gate import gated_segment

        segment_batch = partial(gated_segment, self.predictor, self.gate, config=self.postprocess,
                                policy=self.gate_policy, shape_model=self.shape_model)
        try:
            return segment_batch([a.radiograph for a in admitted])
        except Exception:
            if len(admitted) == 1:
                raise
            log.exception("batch inference failed; retrying the files one by one")
        results: list[Any] = []
        for item in admitted:
            try:
                results.extend(segment_batch([item.radiograph]))
            except Exception as exc:
                results.append(exc)
        return results

    # --- stage 5 -------------------------------------------------------------
    def _write(self, item: _Admitted, segmentation: Any, batch_size: int) -> Outcome:
        from lungseg.edge_runtime import dicom_out
        from lungseg.edge_runtime.overlay import render_overlay

        t0 = time.perf_counter()
        radiograph = item.radiograph
        ds = radiograph.dataset
        with warnings.catch_warnings():  # pydicom/highdicom warnings quote patient data
            warnings.simplefilter("ignore")
            ref, fixed = dicom_out.reference_dataset(ds)
            if not known_character_set(ref):  # values were decoded with the default; keep them as UTF-8
                ref.SpecificCharacterSet = "ISO_IR 192"
                fixed.append("SpecificCharacterSet")
        if fixed:
            log.warning("source attributes invalid for their VR were left empty or out in the outputs",
                        extra={"event": "source_fixed", "file": item.name, "attributes": fixed})
        marks = [("reference", time.perf_counter())]
        spacing = radiograph.pixel_spacing_mm
        areas = area_report(segmentation.final_mask, spacing, ds.get("PatientOrientation"),
                            segmentation.native_pixels_per_pixel)
        qa = qa_report(segmentation.final_mask, segmentation.qa)
        area_lines = []
        if "lung_areas_cm2" in areas:
            area_lines = [f"{k.replace('_', ' ')}: {v:.1f} cm2" for k, v in areas["lung_areas_cm2"].items()
                          if k != "total"] + [f"total: {areas['lung_areas_cm2']['total']:.1f} cm2"]
        else:
            area_lines = ["areas: no usable pixel spacing"]
        review = [flag_words(f) for f in qa.get("review", qa["flags"])]
        notes = [flag_words(f) for f in qa["flags"] if f.startswith(CORRECTION_PREFIXES)]
        if qa["flags"]:
            area_lines.append("QA: " + ", ".join(qa["flags"]))
        prov = self.provenance
        marks.append(("measure", time.perf_counter()))
        pixels = sc_pixels(radiograph.pixels, self.config.sc_max_side)
        rgb = render_overlay(pixels, segmentation.mask_at(pixels.shape),
                             legend=[f"model {prov.model_name} {prov.model_version} ({prov.backend})"],
                             areas=area_lines, review=review, notes=notes,
                             patient_orientation=ds.get("PatientOrientation"))
        paths = output_paths(self.out, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), self.config.seg)
        review_text = "REVIEW: " + ", ".join(review) if review else ""
        comments = "; ".join([f"{dicom_out.CAPTION}.", *([review_text] if review else []), *notes, *area_lines])
        marks.append(("render", time.perf_counter()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc = dicom_out.build_sc(ref, rgb, prov, syntax=self.config.sc_syntax, comments=comments)
            marks.append(("sc_encode", time.perf_counter()))
            seg = (dicom_out.build_seg(ref, segmentation.mask, prov, review=review_text)
                   if self.config.seg else None)
            marks.append(("seg_encode", time.perf_counter()))
        with StagedFiles() as staged:
            encoded = io.BytesIO()  # one write and one fsync instead of many small writes
            sc.save_as(encoded, enforce_file_format=True)
            staged.write(paths["sc"], encoded.getbuffer())  # every byte written and fsynced, or it raises
            marks.append(("sc_save", time.perf_counter()))
            encoded.seek(0)  # the bytes just written: reading the file back would read them from the page cache
            dicom_out.verify_sc(encoded, rgb, decode=self.config.sc_verify == "decode")
            marks.append(("sc_verify", time.perf_counter()))
            if seg is not None:
                tmp_seg = staged.stage(paths["seg"])
                seg.save_as(tmp_seg, enforce_file_format=True)
                dicom_out.verify_seg(tmp_seg, segmentation.mask)
            marks.append(("seg_save_verify", time.perf_counter()))
            write_ms = (time.perf_counter() - t0) * 1000
            write_stages = {name: round((at - before) * 1000, 2)
                            for (name, at), (_, before) in zip(marks, [("start", t0), *marks[:-1]], strict=True)}
            timings = {"decode": round(item.decode_ms, 2),
                       **{k: round(v, 2) for k, v in segmentation.timings_ms.items()},
                       "write": round(write_ms, 2)}
            timings["total"] = round(sum(timings.values()), 2)
            sidecar = {
                "schema": SIDECAR_SCHEMA,
                "disclaimer": dicom_out.CAPTION,
                "processed_at": _now(),
                "source": {
                    "file": item.name,
                    "file_ref": item.key,
                    "sha256": item.sha256,
                    "sop_instance_uid": str(ds.SOPInstanceUID),
                    "sop_class_uid": str(ds.SOPClassUID),
                    "study_instance_uid": str(ds.StudyInstanceUID),
                    "series_instance_uid": str(ds.SeriesInstanceUID),
                    "modality": str(ds.get("Modality", "")),
                    "rows": radiograph.source_shape[0],
                    "columns": radiograph.source_shape[1],
                    "attributes_emptied_in_outputs": fixed,
                },
                "outputs": {
                    "secondary_capture": {"file": paths["sc"].name, "sop_instance_uid": str(sc.SOPInstanceUID),
                                          "series_instance_uid": str(sc.SeriesInstanceUID),
                                          "transfer_syntax": sc.file_meta.TransferSyntaxUID.name},
                    **({"segmentation": {"file": paths["seg"].name, "sop_instance_uid": str(seg.SOPInstanceUID),
                                         "series_instance_uid": str(seg.SeriesInstanceUID)}}
                       if seg is not None else {}),
                },
                "pixel_spacing_mm": list(spacing) if spacing else None,
                "rendered": {"rows": int(radiograph.pixels.shape[0]), "columns": int(radiograph.pixels.shape[1]),
                             "sc_rows": int(rgb.shape[0]), "sc_columns": int(rgb.shape[1]),
                             "decoded_level": radiograph.facts.get("decoded_level", 0)},
                **areas,
                "qa": qa,
                "timings_ms": timings,
                "write_stages_ms": write_stages,
                "decode_parts_ms": decode_parts(item.decode_ms, radiograph.facts.get("decode_ms_worker")),
                "backend": prov.backend,
                "precision": prov.precision,
                "fallbacks": self.fallbacks,
                **self.backend_summary(),
                "batch_size": batch_size,
                "model": {"name": prov.model_name, "version": prov.model_version, "file": prov.model_file,
                          "sha256": prov.model_sha256, "threshold": prov.threshold},
                "software": {"lungseg": prov.software_version},
            }
            staged.write(paths["sidecar"], (json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n").encode())
            published = staged.publish()
        outputs = [p.relative_to(self.out).as_posix() for p in published]
        self.ledger.record_done(sha256=item.sha256, sop_uid=str(ds.SOPInstanceUID), name=item.key,
                                size=item.size, study_uid=str(ds.StudyInstanceUID), outputs=outputs,
                                backend=prov.backend, model=f"{prov.model_name} {prov.model_version}",
                                forward=[o for o in outputs if o.endswith(".dcm")] if self.config.forward_host else [])
        total_write = (time.perf_counter() - t0) * 1000
        _record_metrics({**timings, "write": total_write}, qa["flags"])
        log.info("processed", extra={"event": "processed", "file": item.name, "sop": uid_ref(str(ds.SOPInstanceUID)),
                                     "timings_ms": {**timings, "write": round(total_write, 2)},
                                     "write_stages_ms": {**write_stages, "publish": round(total_write - write_ms, 2)},
                                     "qa": qa["flags"], "outputs": len(outputs)})
        self.admission.settled(item.key)
        return Outcome(item.name, "done", outputs=outputs, path=item.path)

    # --- the batch -----------------------------------------------------------
    def process(self, paths: list[Path]) -> list[Outcome]:
        """Handle a batch of ready files; never raises for a bad input, gives every file an outcome."""
        outcomes: list[Outcome] = []
        admitted: list[_Admitted] = []
        batch_uids: set[str] = set()
        batch_shas: set[str] = set()
        suspects = [p for p in paths if self._suspect(p)]
        if suspects:  # suspects go alone, and only once nothing else is waiting
            alone = suspects[0] if len(suspects) == len(paths) else None
            outcomes.extend(self.admission.again(p, "suspect_waits", 0.0) for p in suspects if p != alone)
            paths = [alone] if alone is not None else [p for p in paths if p not in suspects]
        for index, path in enumerate(paths):
            if self.stop.is_set():
                outcomes.extend(Outcome(self._name(p), "abandoned", path=p) for p in paths[index:])
                break
            if admitted and admitted[0].suspect:  # a suspect goes alone: the rest waits for the next batch
                outcomes.extend(self.admission.again(p, "behind_a_suspect", 0.0) for p in paths[index:])
                break
            try:
                item, outcome = self._admit(path, batch_uids, batch_shas, first=not admitted)
            except PASSTHROUGH:
                raise
            except (OSError, sqlite3.Error, MemoryError) as exc:  # unreadable file (permissions), ledger, memory
                item, outcome = None, self._retry(path, "admit_failed", "could not read or look up", exc)
            if outcome is not None:
                outcomes.append(outcome)
                if outcome.status == "duplicate":
                    metrics.count("duplicates")
            if item is not None:
                admitted.append(item)
        if not admitted or self.stop.is_set():
            return self._abandon(admitted, 0, outcomes)
        if len(admitted) == 1:  # alone in progress: were the daemon to die now, this content is to blame
            try:
                self.ledger.set_solo(admitted[0].sha256)
            except sqlite3.Error:
                log.debug("could not mark the attempt", exc_info=True)
        try:
            results = self._segment(admitted)
        except PASSTHROUGH:
            raise
        except BaseException as exc:  # a native panic in inference must not take the daemon down
            results = [exc] * len(admitted)
        for index, (item, result) in enumerate(zip(admitted, results, strict=True)):
            if self.stop.is_set():
                return self._abandon(admitted, index, outcomes)
            if isinstance(result, MemoryError) or (isinstance(result, Exception) and _allocation_failure(result)):
                self.ledger.end_attempt(item.sha256)
                outcomes.append(self._retry(item.path, "out_of_memory", "no memory for inference now", result))
                continue
            if isinstance(result, BaseException):
                outcomes.append(self._quarantine(item, "inference_error", f"inference failed ({describe(result)})"))
                continue
            if isinstance(result, Refused):  # the image gate: not a frontal chest radiograph
                kind = result.code.split(":")[0]
                outcomes.append(self._quarantine(item, f"refused_{kind}", f"refused ({result.code}): {result.message}"))
                continue
            outcomes.append(self._write_safely(item, result, len(admitted)))
        return outcomes

    def _suspect(self, path: Path) -> bool:
        try:
            return self.admission.is_suspect(path)
        except sqlite3.Error:
            return False

    def _abandon(self, admitted: list[_Admitted], start: int, outcomes: list[Outcome]) -> list[Outcome]:
        """Stopping: the rest of the batch stays unrecorded (processed after the next start)."""
        for item in admitted[start:]:
            try:
                self.ledger.end_attempt(item.sha256)
            except sqlite3.Error:
                log.debug("could not clear an attempt", exc_info=True)
            outcomes.append(Outcome(item.name, "abandoned", path=item.path))
        return outcomes

    def _write_safely(self, item: _Admitted, segmentation: Any, batch_size: int) -> Outcome:
        """Write one file's outputs; output faults are retried, anything else is the input's fault."""
        try:
            return self._write(item, segmentation, batch_size)
        except PASSTHROUGH:
            raise
        except (sqlite3.Error, MemoryError) as exc:  # ledger locked or full, a brief memory shortage
            self.ledger_end_attempt(item)
            return self._retry(item.path, "write_failed", "could not write outputs", exc)
        except BaseException as exc:
            if is_output_fault(exc):  # disk full, read-only or unwritable output folder
                self.ledger_end_attempt(item)
                return self._retry(item.path, "write_failed", "could not write outputs", exc)
            # e.g. "No tag to read" from a malformed element, an unknown character set, a panic in an encoder
            log.error("could not build outputs from this input (%s)", describe(exc),
                      extra={"event": "output_error", "file": item.name})
            return self._quarantine(item, "output_error", f"outputs could not be built from this input "
                                    f"({describe(exc)})")

    def ledger_end_attempt(self, item: _Admitted) -> None:
        try:
            self.ledger.end_attempt(item.sha256)
        except sqlite3.Error:
            log.debug("could not clear an attempt", exc_info=True)
