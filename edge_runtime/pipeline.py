"""The work done on a batch of ready files: decode, gate, segment, measure, render, write, publish.

:class:`Processor` coordinates the stages of :mod:`lungseg.edge_runtime.stages`; per file,
in order:

1. *decode*   :meth:`Admission.admit <lungseg.edge_runtime.admission.Admission.admit>` reads the
              file without following links, hashes the content (or takes the hash the ledger
              cached for this path, size, mtime, ctime and inode), skips content the ledger
              already knows, records the attempt, and decodes it with
              :func:`lungseg.dicom_decode.read_dicom` in an isolated worker process
              (:mod:`~lungseg.edge_runtime.isolate`); what it refuses (and anything else
              unreadable) goes to quarantine with its reason code. A SOPInstanceUID that
              already has outputs is recorded as a duplicate.
2. *gate, segment*  one :func:`lungseg.gate.gated_segment` call for the whole batch
              (:class:`~lungseg.edge_runtime.stages.SegmentStage`): the image gate's verdict,
              its corrections, the segmentation and the mask QA; a refused image is quarantined.
3. *measure*  areas and QA come from the model-resolution mask.
4. *render*   the overlay image and its captions.
5. *write*    overlay SC and optional SEG to temp names; both DICOM files are checked (the
              SC's bytes as written parsed and its pixel bytes compared, or decoded with
              ``sc_verify = "decode"``; the SEG read back and decoded).
6. *publish*  the JSON sidecar (:mod:`~lungseg.edge_runtime.sidecar`) is staged, all are
              renamed into place, the folder is fsynced, and only then is the ledger
              committed. An interrupted write leaves no output and no ledger row, so the file
              is simply processed again after a restart.

Faults are classified: whatever comes from the input (including a value that makes
output building fail) is quarantined; only real output faults (disk full, permission,
read-only, I/O), ledger errors and ``MemoryError`` are retried, with backoff.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

from lungseg.bundle import Bundle, sha256_file
from lungseg.dicom_out import Provenance
from lungseg.edge_runtime import audit, drift_monitor, service_metrics, stages
from lungseg.edge_runtime.admission import PASSTHROUGH, Admission, Admitted, Outcome, describe
from lungseg.edge_runtime.backend_status import report_backend_to_metrics, write_backend_status
from lungseg.edge_runtime.codes import QuarantineReason, RetryReason, Status
from lungseg.edge_runtime.config import EdgeConfig
from lungseg.edge_runtime.fsio import StagedFiles, is_output_fault
from lungseg.edge_runtime.ledger import Ledger
from lungseg.edge_runtime.logs import uid_ref
from lungseg.edge_runtime.quarantine import Quarantine
from lungseg.edge_runtime.sidecar import BackendHealth
from lungseg.edge_runtime.stages import SegmentResult, StageClock
from lungseg.gate import Refused, load_gate
from lungseg.inference import Segmentation
from lungseg.plausibility import load_shape_model
from lungseg.postprocess import PostprocessConfig
from lungseg.predictors import Predictor

log = logging.getLogger("lungseg.edge")


class MonitoredPredictor(Predictor, Protocol):
    """A predictor that reports its state and demotes itself on backend errors
    (:class:`lungseg.predictors.FallbackPredictor`)."""

    def on_change(self, listener: Callable[[Any], None]) -> None: ...

    def status(self) -> dict[str, Any]: ...


def allocation_failure(exc: BaseException) -> bool:
    """An inference runtime that could not allocate (onnxruntime raises ``Fail``/``RuntimeException``)."""
    text = str(exc).lower()
    return "bad_alloc" in text or "failed to allocate" in text or "out of memory" in text


def start_provenance(bundle: Bundle, predictor: Predictor, threshold: float) -> Provenance:
    """What produced the outputs, at start-up (the model file hashed once)."""
    model_file = Path(getattr(predictor, "model_path", bundle.onnx))
    return Provenance.of(bundle, model_file, predictor.backend, predictor.precision, threshold)


class Processor:
    """Turns batches of ready files into outputs; owns the predictor, ledger and quarantine."""

    def __init__(self, config: EdgeConfig, predictor: Predictor, bundle: Bundle, ledger: Ledger,
                 stop: threading.Event | None = None, fallbacks: list[str] | None = None):
        self.config = config
        self.predictor = predictor
        self.bundle = bundle
        self.ledger = ledger
        self.stop = stop or threading.Event()
        self.fallbacks = list(fallbacks or [])
        self.out = config.out_dir
        self.watch = config.watch_dir.resolve()
        threshold = config.threshold if config.threshold is not None else float(
            bundle.metadata.get("threshold", 0.5))
        self.postprocess = PostprocessConfig(threshold=threshold, resolution=config.postprocess_resolution)
        self.provenance = start_provenance(bundle, predictor, threshold)
        self.quarantine = Quarantine(config.quarantine_dir, config.quarantine_mode, ledger)
        self.gate_policy = config.gate_policy()
        self.gate = load_gate(bundle.root) if self.gate_policy.mode != "off" else None
        self.shape_model = load_shape_model(bundle.root)
        self.segment = stages.SegmentStage(predictor, self.gate, self.postprocess, self.gate_policy,
                                           self.shape_model)
        self.admission = Admission(config, ledger, self.quarantine, self.watch)
        if hasattr(predictor, "on_change"):  # lungseg.predictors.FallbackPredictor: demotes on backend errors
            monitored = cast(MonitoredPredictor, predictor)
            monitored.on_change(self._backend_changed)
            self._backend_changed(monitored)

    def _backend_changed(self, predictor: MonitoredPredictor) -> None:
        """After start-up and every demotion: new provenance, ``<state>/backend.json``, metrics."""
        model_file = Path(predictor.model_path)
        sha = (self.provenance.model_sha256 if model_file.name == self.provenance.model_file  # hashed at start
               else sha256_file(model_file))
        self.provenance = dataclasses.replace(
            self.provenance, backend=predictor.backend, precision=predictor.precision,
            model_file=model_file.name, model_sha256=sha)
        status = predictor.status()
        write_backend_status(self.config.state_dir, status)
        report_backend_to_metrics(status)
        self._demotions_audited = audit.record_backend(status, getattr(self, "_demotions_audited", -1))

    def backend_health(self) -> BackendHealth | None:
        """Self-test and demotions of the serving backend, for the sidecar (``None`` for a plain predictor)."""
        status = getattr(self.predictor, "status", None)
        if not callable(status):
            return None
        current = status()
        selftest = current.get("selftest") or {}
        return BackendHealth(selftest={k: selftest.get(k) for k in ("passed", "dice_mean", "dice_min", "n_images",
                                                                     "reason")},
                             demotions=current.get("demotions", []),
                             backend_choice={"device": current.get("device"),
                                             **{k: v for k, v in (current.get("choice") or {}).items()
                                                if k in ("by", "chosen", "reason", "ms_per_image_b1")}})

    def close(self) -> None:
        """Stop the decode worker."""
        self.admission.close()

    # --- outcomes --------------------------------------------------------------------------------------
    def _name(self, path: Path) -> str:
        return self.admission.label(path)

    def _retry(self, path: Path, code: str, what: str, exc: BaseException) -> Outcome:
        return self.admission.retry(path, code, what, exc)

    def _quarantine(self, item: Admitted, code: str, message: str) -> Outcome:
        return self.admission.quarantine(item.path, item.key, item.sha256, item.size, code, message, item.data)

    def _end_attempt(self, item: Admitted) -> None:
        try:
            self.ledger.end_attempt(item.sha256)
        except sqlite3.Error:
            log.debug("could not clear an attempt", exc_info=True)

    # --- the batch -------------------------------------------------------------------------------------
    def process(self, paths: list[Path]) -> list[Outcome]:
        """Handle a batch of ready files; never raises for a bad input, gives every file an outcome."""
        outcomes: list[Outcome] = []
        admitted = self._decode(self._suspects_go_alone(paths, outcomes), outcomes)
        if not admitted or self.stop.is_set():
            return self._abandon(admitted, 0, outcomes)
        if len(admitted) == 1:  # alone in progress: were the daemon to die now, this content is to blame
            try:
                self.ledger.set_solo(admitted[0].sha256)
            except sqlite3.Error:
                log.debug("could not mark the attempt", exc_info=True)
        results = self._gate_and_segment(admitted)
        for index, (item, result) in enumerate(zip(admitted, results, strict=True)):
            if self.stop.is_set():
                return self._abandon(admitted, index, outcomes)
            outcomes.append(self._settle(item, result, len(admitted)))
        return outcomes

    def _suspects_go_alone(self, paths: list[Path], outcomes: list[Outcome]) -> list[Path]:
        """Suspects go alone, and only once nothing else is waiting."""
        suspects = [p for p in paths if self._suspect(p)]
        if not suspects:
            return paths
        alone = suspects[0] if len(suspects) == len(paths) else None
        outcomes.extend(self.admission.again(p, RetryReason.SUSPECT_WAITS, 0.0) for p in suspects if p != alone)
        return [alone] if alone is not None else [p for p in paths if p not in suspects]

    def _suspect(self, path: Path) -> bool:
        try:
            return self.admission.is_suspect(path)
        except sqlite3.Error:
            return False

    def _decode(self, paths: list[Path], outcomes: list[Outcome]) -> list[Admitted]:
        """Stage *decode*: admit each file in turn; every file not admitted gets its outcome."""
        admitted: list[Admitted] = []
        batch_uids: set[str] = set()
        batch_shas: set[str] = set()
        for index, path in enumerate(paths):
            if self.stop.is_set():
                outcomes.extend(Outcome(self._name(p), Status.ABANDONED, path=p) for p in paths[index:])
                break
            if admitted and admitted[0].suspect:  # a suspect goes alone: the rest waits for the next batch
                outcomes.extend(self.admission.again(p, RetryReason.BEHIND_A_SUSPECT, 0.0) for p in paths[index:])
                break
            try:
                item, outcome = self.admission.admit(path, batch_uids, batch_shas, first=not admitted)
            except PASSTHROUGH:
                raise
            except (OSError, sqlite3.Error, MemoryError) as exc:  # unreadable file (permissions), ledger, memory
                item, outcome = None, self._retry(path, RetryReason.ADMIT_FAILED, "could not read or look up", exc)
            if outcome is not None:
                outcomes.append(outcome)
                if outcome.status == Status.DUPLICATE:
                    service_metrics.count("duplicates")
            if item is not None:
                admitted.append(item)
        return admitted

    def _gate_and_segment(self, admitted: list[Admitted]) -> list[SegmentResult]:
        """Stage *gate, segment*: a result per file; a native panic in inference must not take the daemon down."""
        try:
            return self.segment([a.radiograph for a in admitted])
        except PASSTHROUGH:
            raise
        except BaseException as exc:
            return [exc] * len(admitted)

    def _settle(self, item: Admitted, result: SegmentResult, batch_size: int) -> Outcome:
        """The gate's and the segmenter's verdict on one file: retry, quarantine, or write its outputs."""
        if isinstance(result, MemoryError) or (isinstance(result, Exception) and allocation_failure(result)):
            self.ledger.end_attempt(item.sha256)
            return self._retry(item.path, RetryReason.OUT_OF_MEMORY, "no memory for inference now", result)
        if isinstance(result, BaseException):
            return self._quarantine(item, QuarantineReason.INFERENCE_ERROR, f"inference failed ({describe(result)})")
        if isinstance(result, Refused):  # the image gate: not a frontal chest radiograph
            return self._quarantine(item, QuarantineReason.refused(result.code),
                                    f"refused ({result.code}): {result.message}")
        return self._write_safely(item, result, batch_size)

    def _abandon(self, admitted: list[Admitted], start: int, outcomes: list[Outcome]) -> list[Outcome]:
        """Stopping: the rest of the batch stays unrecorded (processed after the next start)."""
        for item in admitted[start:]:
            self._end_attempt(item)
            outcomes.append(Outcome(item.name, Status.ABANDONED, path=item.path))
        return outcomes

    # --- one file's outputs ----------------------------------------------------------------------------
    def _write_safely(self, item: Admitted, segmentation: Segmentation, batch_size: int) -> Outcome:
        """Write one file's outputs; output faults are retried, anything else is the input's fault."""
        try:
            return self._write(item, segmentation, batch_size)
        except PASSTHROUGH:
            raise
        except (sqlite3.Error, MemoryError) as exc:  # ledger locked or full, a brief memory shortage
            self._end_attempt(item)
            return self._retry(item.path, RetryReason.WRITE_FAILED, "could not write outputs", exc)
        except BaseException as exc:
            if is_output_fault(exc):  # disk full, read-only or unwritable output folder
                self._end_attempt(item)
                return self._retry(item.path, RetryReason.WRITE_FAILED, "could not write outputs", exc)
            # e.g. "No tag to read" from a malformed element, an unknown character set, a panic in an encoder
            log.error("could not build outputs from this input (%s)", describe(exc),
                      extra={"event": "output_error", "file": item.name})
            return self._quarantine(item, QuarantineReason.OUTPUT_ERROR, f"outputs could not be built from this "
                                    f"input ({describe(exc)})")

    def _write(self, item: Admitted, segmentation: Segmentation, batch_size: int) -> Outcome:
        """Stages *measure* to *publish* for one file, each timed (the sidecar's ``write_stages_ms``)."""
        clock, radiograph, prov, config = StageClock(), item.radiograph, self.provenance, self.config
        ds = item.dataset
        ref = stages.reference(ds, item.name)
        clock.mark("reference")
        measured = stages.measure(radiograph, segmentation)
        drift_monitor.observe(radiograph.pixels, radiograph.native_shape or radiograph.pixels.shape[:2],
                              segmentation.final_mask, measured.flags)
        clock.mark("measure")
        paths = stages.output_paths(self.out, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), config.seg,
                                    config.sr, sc=config.sc, gsps=config.gsps)
        rendering = stages.render(radiograph, segmentation, measured, prov, config.sc_max_side,
                                  config.sc_style) if paths.sc is not None else None
        clock.mark("render")
        sc = None
        with StagedFiles() as staged:
            # the SC is encoded, written and fsynced on a thread while the SEG and SR are built here
            sc_job = (stages.BackgroundSc(staged, paths.sc, ref, rendering, prov, syntax=config.sc_syntax,
                                          decode=config.sc_verify == "decode")
                      if paths.sc is not None and rendering is not None else None)
            try:
                seg = stages.encode_seg(ref, segmentation, stages.review_text(measured), prov) if config.seg else None
                clock.mark("seg_encode")
                sr = stages.encode_sr(ref, radiograph, measured, seg, prov) if seg is not None and paths.sr else None
                clock.mark("sr_encode")
                gsps = stages.encode_gsps(ref, radiograph, segmentation, measured, prov) if paths.gsps else None
                if seg is not None and paths.seg is not None:
                    stages.write_seg(staged, paths.seg, seg, segmentation.mask)
                clock.mark("seg_save_verify")
                if sr is not None and paths.sr is not None:
                    stages.write_sr(staged, paths.sr, sr)
                clock.mark("sr_save_verify")
                if gsps is not None and paths.gsps is not None:
                    stages.write_gsps(staged, paths.gsps, gsps)
                    clock.mark("gsps")
            except BaseException:
                if sc_job is not None:
                    sc_job.join()  # before its temp file is discarded
                raise
            if sc_job is not None:
                sc = sc_job.wait(clock)
            write_ms = clock.elapsed_ms()
            write_stages = clock.stages_ms()
            timings = stages.file_timings(item.decode_ms, segmentation.timings_ms, write_ms)
            serving = stages.Serving(prov, self.fallbacks, self.backend_health())
            sidecar = stages.sidecar_for(item, ref, measured, rendering, sc, seg, paths, serving, timings_ms=timings,
                                         write_stages_ms=write_stages, batch_size=batch_size, sr=sr, gsps=gsps)
            published = stages.publish(staged, paths, sidecar)
        outputs = [p.relative_to(self.out).as_posix() for p in published]
        return self._record(item, outputs, measured.flags, clock, timings, write_stages, write_ms)

    def _record(self, item: Admitted, outputs: list[str], flags: list[str], clock: StageClock,
                timings: dict[str, float], write_stages: dict[str, float], write_ms: float) -> Outcome:
        """Stage *publish*, the rest: commit the ledger (only now), then metrics and the log."""
        ds, prov = item.dataset, self.provenance
        self.ledger.record_done(sha256=item.sha256, sop_uid=str(ds.SOPInstanceUID), name=item.key,
                                size=item.size, study_uid=str(ds.StudyInstanceUID), outputs=outputs,
                                backend=prov.backend, model=f"{prov.model_name} {prov.model_version}",
                                forward=[o for o in outputs if o.endswith(".dcm")] if self.config.forward_host else [])
        total_write = clock.elapsed_ms()
        stages.record_metrics({**timings, "write": total_write}, flags)
        audit.record("process", file=item.key, sha256=item.sha256, sop=str(ds.SOPInstanceUID),
                     study=str(ds.StudyInstanceUID), outcome="done", qa=flags, backend=prov.backend,
                     precision=prov.precision, model_version=f"{prov.model_name} {prov.model_version}",
                     bundle_sha256=prov.bundle_sha256, model_sha256=prov.model_sha256)
        audit.record("output", file=item.key, sop=str(ds.SOPInstanceUID),
                     outputs=sorted(o.rsplit("/", 1)[-1][len(str(ds.SOPInstanceUID)) + 1:] for o in outputs),
                     forward=bool(self.config.forward_host))
        log.info("processed", extra={"event": "processed", "file": item.name, "sop": uid_ref(str(ds.SOPInstanceUID)),
                                     "timings_ms": {**timings, "write": round(total_write, 2)},
                                     "write_stages_ms": {**write_stages, "publish": round(total_write - write_ms, 2)},
                                     "qa": flags, "outputs": len(outputs)})
        self.admission.settled(item.key)
        return Outcome(item.name, Status.DONE, outputs=outputs, path=item.path)
