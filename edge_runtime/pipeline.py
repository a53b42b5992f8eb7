"""The work done on a batch of ready files: admit, decode, segment, write, record.

Per file, in order:

1. *admit*   hash the content (or take the hash the ledger cached for this path,
             size and mtime); skip content the ledger already knows.
2. *decode*  :func:`lungseg.dicom_decode.read_dicom`; what it refuses (and
             anything else unreadable) goes to quarantine with its reason code.
3. *dedupe*  a SOPInstanceUID that already has outputs is recorded as a duplicate.
4. *segment* one :func:`lungseg.inference.segment_batch` call for the whole batch.
5. *write*   overlay SC, optional SEG and the JSON sidecar, all to temp names;
             both DICOM files are read back and decoded; then all are renamed
             into place, the folder is fsynced, and only then is the ledger
             committed. An interrupted write leaves no output and no ledger row,
             so the file is simply processed again after a restart.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sqlite3
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungseg.edge_runtime.config import EdgeConfig
from lungseg.edge_runtime.fsio import StagedFiles, sha256_of
from lungseg.edge_runtime.ledger import Ledger
from lungseg.edge_runtime.logs import uid_ref
from lungseg.edge_runtime.quarantine import Quarantine

log = logging.getLogger("lungseg.edge")

SIDECAR_SCHEMA = "lungseg-edge/sidecar/1"
MIN_LUNG_FRACTION = 0.05
MAX_LUNG_FRACTION = 0.70
MIN_LUNG_RATIO = 0.25  # the smaller lung below this fraction of the larger is flagged


@dataclass
class Outcome:
    """What happened to one candidate file."""

    name: str
    status: str  # done | duplicate | seen | quarantined | retry | abandoned | vanished
    code: str | None = None
    outputs: list[str] = field(default_factory=list)
    retry_after: float = 0.0


@dataclass
class _Admitted:
    path: Path
    name: str
    size: int
    sha256: str
    radiograph: Any
    decode_ms: float


def software_version() -> str:
    try:
        from importlib.metadata import version

        return version("lungseg")
    except Exception:
        import lungseg

        return getattr(lungseg, "__version__", "unknown")


_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def _valid_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and _UID.fullmatch(text) is not None


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
                patient_orientation: Any) -> dict[str, Any]:
    """Areas in pixels always, in cm² (total and per lung) only when the spacing is usable."""
    from lungseg.edge_runtime.overlay import side_names
    from lungseg.inference import lung_areas

    areas = lung_areas(mask, spacing_mm)
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


def qa_report(mask: np.ndarray, raw_qa: dict[str, Any]) -> dict[str, Any]:
    from lungseg.postprocess import label_components

    count, _, areas = label_components(mask)
    fraction = float(np.count_nonzero(mask)) / float(mask.size)
    flags = []
    if count != 2:
        flags.append("not_two_lungs")
    elif int(areas.min()) < MIN_LUNG_RATIO * int(areas.max()):
        flags.append("lung_size_asymmetry")  # e.g. an inverted or upside-down image, or a collapsed lung
    if not MIN_LUNG_FRACTION <= fraction <= MAX_LUNG_FRACTION:
        flags.append("implausible_area")
    return {"flags": flags, "components": int(count), "lung_fraction": round(fraction, 4),
            "min_lung_ratio": MIN_LUNG_RATIO,
            "plausible_fraction": [MIN_LUNG_FRACTION, MAX_LUNG_FRACTION], **raw_qa}


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
        self.postprocess = PostprocessConfig(threshold=threshold)
        model_file = Path(getattr(predictor, "model_path", bundle.onnx))
        self.provenance = Provenance(
            model_name=bundle.name, model_version=bundle.version,
            model_sha256=sha256_file(model_file), model_file=model_file.name,
            backend=predictor.backend, precision=predictor.precision,
            software_version=software_version(), threshold=threshold,
        )
        self.quarantine = Quarantine(config.quarantine_dir, config.quarantine_mode, ledger)

    # --- helpers -------------------------------------------------------------
    def _name(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.watch).as_posix()
        except ValueError:
            return path.name

    def _changed(self, path: Path, size: int, mtime_ns: int) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return True
        return (st.st_size, st.st_mtime_ns) != (size, mtime_ns)

    def _retry(self, name: str, code: str, what: str, exc: BaseException) -> Outcome:
        log.error("%s (%s: %s); will retry in %.0f s", what, type(exc).__name__, getattr(exc, "strerror", None) or exc,
                  self.config.retry_seconds, extra={"event": code, "file": name})
        return Outcome(name, "retry", code=code, retry_after=self.config.retry_seconds)

    def _quarantine(self, path: Path, name: str, sha: str, size: int, code: str, message: str) -> Outcome:
        try:
            self.quarantine.put(path, name, sha, size, code, message)
        except (OSError, sqlite3.Error) as exc:  # e.g. disk full: the input is fine, try again later
            return self._retry(name, "quarantine_failed", "could not quarantine", exc)
        log.warning("quarantined: %s", message, extra={"event": "quarantined", "file": name, "code": code})
        return Outcome(name, "quarantined", code=code)

    # --- stage 1-3 -----------------------------------------------------------
    def _admit(self, path: Path, batch_uids: set[str]) -> tuple[_Admitted | None, Outcome | None]:
        from lungseg.dicom_decode import read_dicom
        from lungseg.imaging import UnreadableImageError

        name = self._name(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None, Outcome(name, "vanished")
        size, mtime_ns = st.st_size, st.st_mtime_ns
        sha = self.ledger.sha_for_path(name, size, mtime_ns)
        cached = sha is not None
        if sha is None:
            try:
                sha = sha256_of(path)
            except FileNotFoundError:
                return None, Outcome(name, "vanished")
            if self._changed(path, size, mtime_ns):
                return None, Outcome(name, "retry", code="changed", retry_after=self.config.settle_seconds)
            self.ledger.remember_path(name, size, mtime_ns, sha)
        known = self.ledger.file_status(sha)
        if known is not None:
            if cached or known["name"] == name:  # the same file again (restart, rescan, touch)
                log.debug("already handled", extra={"event": "seen", "file": name, "status": known["status"]})
                return None, Outcome(name, "seen", code=known["status"])
            self.ledger.record_duplicate(sha256=sha, sop_uid=known["sop_uid"], name=name, size=size,
                                         code="same_content")
            log.info("identical content already handled; no new output",
                     extra={"event": "duplicate", "file": name, "first_file": known["name"],
                            "status": known["status"]})
            return None, Outcome(name, "duplicate", code="same_content")
        t0 = time.perf_counter()
        try:
            radiograph = read_dicom(path)
        except UnreadableImageError as exc:
            if self._changed(path, size, mtime_ns):
                return None, Outcome(name, "retry", code="changed", retry_after=self.config.settle_seconds)
            code = getattr(exc, "code", None) or "unreadable"
            return None, self._quarantine(path, name, sha, size, code, exc.reason.replace(str(path), name))
        except Exception as exc:
            if self._changed(path, size, mtime_ns):
                return None, Outcome(name, "retry", code="changed", retry_after=self.config.settle_seconds)
            message = f"{type(exc).__name__}: {exc}".replace(str(path), name)
            return None, self._quarantine(path, name, sha, size, "decode_error", message)
        decode_ms = (time.perf_counter() - t0) * 1000
        ds = radiograph.dataset
        missing = [k for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
                   if ds is None or not ds.get(k)]
        if missing:
            return None, self._quarantine(path, name, sha, size, "missing_uid",
                                          f"no {', '.join(missing)} in the data set")
        bad = [k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not _valid_uid(ds.get(k))]
        if bad:  # they name output files and folders: never let them be paths
            return None, self._quarantine(path, name, sha, size, "invalid_uid",
                                          f"{', '.join(bad)} not a valid DICOM UID")
        sop_uid = str(ds.SOPInstanceUID)
        if sop_uid in batch_uids:  # decide after the first copy is committed
            return None, Outcome(name, "retry", code="same_uid_in_batch", retry_after=0.0)
        previous = self.ledger.instance(sop_uid)
        if previous is not None:
            self.ledger.record_duplicate(sha256=sha, sop_uid=sop_uid, name=name, size=size)
            log.info("duplicate of an instance already processed; no new output",
                     extra={"event": "duplicate", "file": name, "sop": uid_ref(sop_uid),
                            "first_file": previous["source_name"]})
            return None, Outcome(name, "duplicate")
        batch_uids.add(sop_uid)
        return _Admitted(path, name, size, sha, radiograph, decode_ms), None

    # --- stage 4 -------------------------------------------------------------
    def _segment(self, admitted: list[_Admitted]) -> list[Any]:
        from lungseg.inference import segment_batch

        try:
            return segment_batch(self.predictor, [a.radiograph for a in admitted], self.postprocess)
        except Exception:
            if len(admitted) == 1:
                raise
            log.exception("batch inference failed; retrying the files one by one")
        results: list[Any] = []
        for item in admitted:
            try:
                results.extend(segment_batch(self.predictor, [item.radiograph], self.postprocess))
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
        if fixed:
            log.warning("source attributes invalid for their VR were left empty or out in the outputs",
                        extra={"event": "source_fixed", "file": item.name, "attributes": fixed})
        mask = segmentation.mask.astype(bool)
        spacing = radiograph.pixel_spacing_mm
        areas = area_report(mask, spacing, ds.get("PatientOrientation"))
        qa = qa_report(mask, segmentation.qa)
        area_lines = []
        if "lung_areas_cm2" in areas:
            area_lines = [f"{k.replace('_', ' ')}: {v:.1f} cm2" for k, v in areas["lung_areas_cm2"].items()
                          if k != "total"] + [f"total: {areas['lung_areas_cm2']['total']:.1f} cm2"]
        else:
            area_lines = ["areas: no usable pixel spacing"]
        if qa["flags"]:
            area_lines.append("QA: " + ", ".join(qa["flags"]))
        prov = self.provenance
        rgb = render_overlay(radiograph.pixels, mask,
                             legend=[f"model {prov.model_name} {prov.model_version} ({prov.backend})"],
                             areas=area_lines)
        paths = output_paths(self.out, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), self.config.seg)
        comments = f"{dicom_out.CAPTION}. " + "; ".join(area_lines)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc = dicom_out.build_sc(ref, rgb, prov, compress=self.config.sc_syntax == "rle", comments=comments)
            seg = dicom_out.build_seg(ref, mask, prov) if self.config.seg else None
        with StagedFiles() as staged:
            tmp_sc = staged.stage(paths["sc"])
            sc.save_as(tmp_sc, enforce_file_format=True)
            dicom_out.verify_sc(tmp_sc, rgb)
            if seg is not None:
                tmp_seg = staged.stage(paths["seg"])
                seg.save_as(tmp_seg, enforce_file_format=True)
                dicom_out.verify_seg(tmp_seg, mask)
            write_ms = (time.perf_counter() - t0) * 1000
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
                    "sha256": item.sha256,
                    "sop_instance_uid": str(ds.SOPInstanceUID),
                    "sop_class_uid": str(ds.SOPClassUID),
                    "study_instance_uid": str(ds.StudyInstanceUID),
                    "series_instance_uid": str(ds.SeriesInstanceUID),
                    "modality": str(ds.get("Modality", "")),
                    "rows": radiograph.shape[0],
                    "columns": radiograph.shape[1],
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
                **areas,
                "qa": qa,
                "timings_ms": timings,
                "backend": prov.backend,
                "precision": prov.precision,
                "fallbacks": self.fallbacks,
                "batch_size": batch_size,
                "model": {"name": prov.model_name, "version": prov.model_version, "file": prov.model_file,
                          "sha256": prov.model_sha256, "threshold": prov.threshold},
                "software": {"lungseg": prov.software_version},
            }
            tmp_json = staged.stage(paths["sidecar"])
            tmp_json.write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
            published = staged.publish()
        outputs = [p.relative_to(self.out).as_posix() for p in published]
        self.ledger.record_done(sha256=item.sha256, sop_uid=str(ds.SOPInstanceUID), name=item.name,
                                size=item.size, study_uid=str(ds.StudyInstanceUID), outputs=outputs,
                                backend=prov.backend, model=f"{prov.model_name} {prov.model_version}",
                                forward=[o for o in outputs if o.endswith(".dcm")] if self.config.forward_host else [])
        total_write = (time.perf_counter() - t0) * 1000
        log.info("processed", extra={"event": "processed", "file": item.name, "sop": uid_ref(str(ds.SOPInstanceUID)),
                                     "timings_ms": {**timings, "write": round(total_write, 2)},
                                     "qa": qa["flags"], "outputs": len(outputs)})
        return Outcome(item.name, "done", outputs=outputs)

    # --- the batch -----------------------------------------------------------
    def process(self, paths: list[Path]) -> list[Outcome]:
        """Handle a batch of ready files; never raises for a bad input."""
        outcomes: list[Outcome] = []
        admitted: list[_Admitted] = []
        batch_uids: set[str] = set()
        for index, path in enumerate(paths):
            if self.stop.is_set():
                outcomes.extend(Outcome(self._name(p), "abandoned") for p in paths[index:])
                return outcomes
            try:
                item, outcome = self._admit(path, batch_uids)
            except (OSError, sqlite3.Error) as exc:  # unreadable file (permissions), ledger trouble
                item, outcome = None, self._retry(self._name(path), "admit_failed", "could not read or look up", exc)
            if outcome is not None:
                outcomes.append(outcome)
            if item is not None:
                admitted.append(item)
        if not admitted:
            return outcomes
        try:
            results = self._segment(admitted)
        except Exception as exc:
            results = [exc]
        for index, (item, result) in enumerate(zip(admitted, results, strict=True)):
            if self.stop.is_set():
                outcomes.extend(Outcome(a.name, "abandoned") for a in admitted[index:])
                break
            if isinstance(result, Exception):
                outcomes.append(self._quarantine(item.path, item.name, item.sha256, item.size, "inference_error",
                                                 f"{type(result).__name__}: {result}"))
                continue
            try:
                outcomes.append(self._write(item, result, len(admitted)))
            except (OSError, sqlite3.Error) as exc:  # disk full, read-only output, ledger locked...
                outcomes.append(self._retry(item.name, "write_failed", "could not write outputs", exc))
            except Exception as exc:  # the input made output building fail: keep it with the reason
                log.exception("could not build outputs", extra={"file": item.name})
                outcomes.append(self._quarantine(item.path, item.name, item.sha256, item.size, "output_error",
                                                 f"{type(exc).__name__}: {exc}"))
        return outcomes
