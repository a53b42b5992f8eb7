"""The image gate and THE policy: is this a frontal chest radiograph, the right way up, not a negative?

Every front end (``lungseg-segment``, ``lungseg-edge``) segments through :func:`gated_segment`,
which decides per radiograph, in this order:

1. *header*   a declared non-chest ``BodyPartExamined`` or a lateral ``ViewPosition`` is refused
              (reason ``body_part:<VALUE>`` / ``lateral_view:<VALUE>``) unless the gate is ``off``.
2. *gate*     a small CNN (``gate.onnx`` in the model bundle) reads the same presentation-ready
              image the segmenter sees (:func:`gate_input`) and gives four heads: quarter turns
              (0/90/180/270), negative, mirrored, not-a-chest.
3. *correct*  with ``auto_orient`` on, a confident quarter turn or negative is undone, the corrected
              image is segmented and the mask mapped back to the stored pixel grid (flags
              ``orientation_corrected:<deg>``, the counter-clockwise turn that made it upright, and
              ``negative_corrected``); with it off they are flagged (``orientation_suspect:<deg>``,
              ``negative_suspect``).
4. *flag*     not confident, mirrored, or not a chest: flagged (``gate_uncertain:<head>``,
              ``mirrored``, ``not_chest``); a confident not-a-chest is refused in ``refuse`` mode.
              The mirror score weighs the image against its own left-right flip
              (:func:`consensus_logits`), and its threshold is the one calibrated for the
              bundle's gate on its training patients (``gate.json``, ``policy``) unless given.
5. *QA*       :func:`lungseg.plausibility.mask_qa` on the final mask, in the upright frame:
              components, area, lung ratio, and the shape model.

Without a gate model in the bundle, the gate heads are skipped, the result carries the flag
``gate_unavailable`` (so nothing passes unreviewed that the gate would have checked) and the
header and mask checks still run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lungseg.backend_api import Predictor
from lungseg.bundle import GATE_MANIFEST, GATE_ONNX, verified_file
from lungseg.gate_options import DEFAULT_MIRRORED_THRESHOLD, GATE_MODES
from lungseg.inference import Segmentation, segment_batch
from lungseg.plausibility import ShapeModel, mask_qa
from lungseg.postprocess import PostprocessConfig
from lungseg.preprocess import INPUT_SIZE, Geometry, preprocess
from lungseg.radiograph import Radiograph

log = logging.getLogger(__name__)

GATE_SIZE = 128
GATE_INPUT_NAME = "image"
GATE_OUTPUT_NAME = "logits"
# Logit layout of the gate's single output: orientation (4), negative (2), mirrored (2), chest (2).
HEADS: dict[str, slice] = {"orientation": slice(0, 4), "negative": slice(4, 6), "mirrored": slice(6, 8),
                           "chest": slice(8, 10)}
N_LOGITS = 10

NON_CHEST_BODY_PARTS = frozenset({
    "HAND", "KNEE", "FOOT", "ANKLE", "WRIST", "ELBOW", "SHOULDER", "HIP", "PELVIS", "SKULL", "HEAD", "BRAIN",
    "CSPINE", "TSPINE", "LSPINE", "SPINE", "EXTREMITY", "FINGER", "TOE", "FOREARM", "ARM", "LEG", "FEMUR",
    "TIBIA", "HUMERUS", "HEEL", "JAW", "TMJ", "SINUS", "NECK", "BREAST", "ABDOMEN", "KIDNEY", "SACRUM", "COCCYX",
    "CLAVICLE", "SCAPULA", "LOWEXM", "UPREXM", "LOWLIMB", "UPRLIMB", "FACE", "ORBIT", "NOSE", "EAR", "PANCREAS",
    "LIVER", "BLADDER", "UTERUS", "PROSTATE", "HEART",
})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "PORT CHEST", "CHEST_LAT", "RIBS", "ABDCHEST"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LLD", "RLD", "LAT", "LATERAL", "LATERAL LEFT", "LATERAL RIGHT"})


def dihedral(x: np.ndarray, quarter_turns: int, mirrored: bool) -> np.ndarray:
    """The gate's view of a transformed image: mirror left-right, then ``np.rot90`` by ``quarter_turns``.

    Exact on letterboxed square inputs (up to a one-pixel centring difference).
    """
    out = x[..., :, ::-1] if mirrored else x
    return np.ascontiguousarray(np.rot90(out, quarter_turns, axes=(-2, -1)))


def gate_input(model_input: np.ndarray) -> np.ndarray:
    """The gate's input from the segmenter's: ``(C, 256, 256)`` -> ``(1, GATE_SIZE, GATE_SIZE)`` float32.

    The single definition shared by training and runtime: the segmenter's letterboxed,
    normalised first channel, area-downscaled.
    """
    if model_input.ndim != 3 or model_input.shape[1] != model_input.shape[2]:
        raise ValueError(f"expected a (C, S, S) model input, got {model_input.shape}")
    return cv2.resize(model_input[0], (GATE_SIZE, GATE_SIZE), interpolation=cv2.INTER_AREA)[None].astype(np.float32)


def gate_input_from_pixels(pixels: np.ndarray) -> np.ndarray:
    """Presentation-ready MONOCHROME2 [0, 1] pixels -> gate input, through the core preprocessing."""
    return gate_input(preprocess(np.asarray(pixels, np.float32), INPUT_SIZE)[0])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class GateScores:
    """Per-head probabilities for one image."""

    orientation: tuple[float, float, float, float]  # P(image = upright turned by k quarter turns, np.rot90 sense)
    negative: float
    mirrored: float
    chest: float

    @classmethod
    def from_logits(cls, logits: np.ndarray) -> GateScores:
        p = {name: softmax(np.asarray(logits[s], np.float64)) for name, s in HEADS.items()}
        return cls(orientation=tuple(float(v) for v in p["orientation"]),  # type: ignore[arg-type]
                   negative=float(p["negative"][1]), mirrored=float(p["mirrored"][1]), chest=float(p["chest"][1]))

    @property
    def quarter_turns(self) -> int:
        return int(np.argmax(self.orientation))

    def to_dict(self) -> dict[str, Any]:
        return {"orientation": [round(v, 4) for v in self.orientation], "negative": round(self.negative, 4),
                "mirrored": round(self.mirrored, 4), "chest": round(self.chest, 4)}


def mirror_evidence(logits: np.ndarray) -> np.ndarray:
    """The mirror head's logit difference (``log p(mirrored) / p(upright)``), per row."""
    first = HEADS["mirrored"].start
    return logits[:, first + 1] - logits[:, first]


def consensus_logits(logits_of: Any, batch: np.ndarray) -> np.ndarray:
    """Gate logits whose mirror head weighs the image against its own left-right flip.

    ``logits_of`` runs the gate on a batch; it sees ``batch`` and its flip in one call. The
    mirror head's evidence (logit difference) becomes the mean of the image's and, sign
    reversed, its flip's: a mirrored image must look mirrored *and* its flip upright. The
    other heads are the image's own. (The flip is of the gate input, as in training.)
    """
    batch = np.asarray(batch, np.float32)
    both = logits_of(np.concatenate([batch, np.ascontiguousarray(batch[..., ::-1])]))
    plain, flipped = both[:len(batch)], both[len(batch):]
    first = HEADS["mirrored"].start
    evidence = 0.5 * (mirror_evidence(plain) - mirror_evidence(flipped))
    out = np.array(plain, dtype=np.float32)
    out[:, first], out[:, first + 1] = 0.0, evidence
    return out


class GateModel:
    """The gate ONNX model on onnxruntime's CPU provider (one thread by default: it is tiny)."""

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.version = meta.get("gate_version", "unknown")
        self.mirrored_threshold = calibrated_mirror_threshold(self.path.parent)

    def policy(self, policy: GatePolicy) -> GatePolicy:
        """``policy`` with what it leaves open (the mirror threshold) taken from this gate's calibration."""
        if policy.mirrored_threshold is not None:
            return policy
        from dataclasses import replace

        return replace(policy, mirrored_threshold=self.mirrored_threshold or DEFAULT_MIRRORED_THRESHOLD)

    def raw_logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([GATE_OUTPUT_NAME], {GATE_INPUT_NAME: batch.astype(np.float32)})[0]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The logits the policy reads: :func:`consensus_logits` (two gate runs per image, one batch)."""
        return consensus_logits(self.raw_logits, batch)

    def scores(self, gate_batch: np.ndarray) -> list[GateScores]:
        return [GateScores.from_logits(row) for row in self.logits(gate_batch)]


def calibrated_mirror_threshold(bundle_root: Path) -> float | None:
    """``policy.mirrored_threshold`` of the bundle's ``gate.json`` (checked against ``bundle.json``), if any."""
    import json

    if not (bundle_root / GATE_MANIFEST).is_file():
        return None
    try:
        policy = json.loads(verified_file(bundle_root, GATE_MANIFEST).read_text()).get("policy")
        if not policy:  # a gate from before calibrated thresholds
            log.info("the bundle's gate record has no calibrated mirror threshold; using %.2f",
                     DEFAULT_MIRRORED_THRESHOLD)
            return None
        value = float(policy["mirrored_threshold"])
    except (ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        log.warning("no calibrated mirror threshold in the bundle's gate record (%s); using %.2f", exc,
                    DEFAULT_MIRRORED_THRESHOLD)
        return None
    return value if 0.0 < value < 1.0 else None


def load_gate(bundle_root: str | Path | None) -> GateModel | None:
    """The bundle's gate model, or ``None`` when the bundle has none."""
    if bundle_root is None:
        return None
    root = Path(bundle_root)
    if not (root / GATE_ONNX).is_file():
        log.warning("the model bundle has no %s: images are not checked for orientation, negative, mirror "
                    "or chest (every result is flagged gate_unavailable)", GATE_ONNX)
        return None
    try:
        return GateModel(verified_file(root, GATE_ONNX))
    except Exception as exc:  # a changed or broken gate file: run without it, and flag every result
        log.error("the bundle's %s is not usable (%s): every result is flagged gate_unavailable", GATE_ONNX, exc)
        return None


# --- policy ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GatePolicy:
    """What the gate does with its scores. Defaults are the safe ones."""

    mode: str = "refuse"  # off | flag | refuse
    auto_orient: bool = True
    correct_threshold: float = 0.9  # a head's top probability needed to correct
    uncertain_threshold: float = 0.7  # below this the head is "not confident" and the image flagged
    mirrored_threshold: float | None = None  # None: the bundle gate's calibrated one (gate.json), else 0.9
    not_chest_flag: float = 0.5  # P(not chest) above this: flag
    not_chest_refuse: float = 0.9  # P(not chest) above this: refused (mode refuse)

    def __post_init__(self) -> None:
        if self.mode not in GATE_MODES:
            raise ValueError(f"gate mode {self.mode!r} is not one of {', '.join(GATE_MODES)}")
        for name in ("correct_threshold", "uncertain_threshold", "mirrored_threshold", "not_chest_flag",
                     "not_chest_refuse"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"gate {name.replace('_', ' ')} {value} is not in [0, 1]")


@dataclass
class Correction:
    """How the stored image was turned into the one that was segmented."""

    quarter_turns: int = 0  # np.rot90 count that brought the stored image upright
    negative: bool = False

    @property
    def degrees(self) -> int:
        return (self.quarter_turns % 4) * 90

    @property
    def any(self) -> bool:
        return bool(self.quarter_turns % 4) or self.negative

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        out = 1.0 - pixels if self.negative else pixels
        return np.ascontiguousarray(np.rot90(out, self.quarter_turns))

    def undo_mask(self, mask: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(mask, -self.quarter_turns))


@dataclass
class GateDecision:
    """The policy's verdict on one radiograph."""

    refused: str | None = None  # reason code when refused
    refused_message: str = ""
    correction: Correction = field(default_factory=Correction)
    flags: list[str] = field(default_factory=list)
    scores: GateScores | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"refused": self.refused, "correction": asdict(self.correction) | {"degrees": self.correction.degrees},
                "flags": list(self.flags), "scores": self.scores.to_dict() if self.scores else None}


def header_refusal(dataset: Any) -> tuple[str, str] | None:
    """(code, message) when the header declares a non-chest body part or a lateral view."""
    if dataset is None:
        return None
    body = str(dataset.get("BodyPartExamined", "") or "").strip().upper()
    if body and body not in CHEST_BODY_PARTS and body in NON_CHEST_BODY_PARTS:
        return f"body_part:{body}", f"BodyPartExamined is {body}, not a chest: not segmented"
    view = str(dataset.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        return f"lateral_view:{view}", f"ViewPosition is {view} (lateral): only frontal chest views are segmented"
    return None


def decide(scores: GateScores | None, dataset: Any, policy: GatePolicy) -> GateDecision:
    """Apply the policy to one image's gate scores (``None``: no gate model) and header."""
    decision = GateDecision(scores=scores)
    if policy.mode == "off":
        return decision
    refusal = header_refusal(dataset)
    if refusal is not None:
        decision.refused, decision.refused_message = refusal
        if policy.mode == "refuse":
            return decision
        decision.refused = None
        decision.flags.append(refusal[0])
    if scores is None:
        decision.flags.append("gate_unavailable")
        return decision
    not_chest = 1.0 - scores.chest
    if not_chest >= policy.not_chest_refuse and policy.mode == "refuse":
        decision.refused = "not_chest"
        decision.refused_message = f"the image gate sees no frontal chest radiograph (p={not_chest:.2f})"
        return decision
    if not_chest >= policy.not_chest_flag:
        decision.flags.append("not_chest")
    turns = scores.quarter_turns
    p_turn = scores.orientation[turns]
    if turns and p_turn >= policy.correct_threshold and policy.auto_orient:
        decision.correction.quarter_turns = (4 - turns) % 4
        decision.flags.append(f"orientation_corrected:{decision.correction.degrees}")
    elif turns:
        decision.flags.append(f"orientation_suspect:{((4 - turns) % 4) * 90}")
    elif p_turn < policy.uncertain_threshold:
        decision.flags.append("gate_uncertain:orientation")
    if scores.negative >= policy.correct_threshold and policy.auto_orient:
        decision.correction.negative = True
        decision.flags.append("negative_corrected")
    elif scores.negative >= 0.5:
        decision.flags.append("negative_suspect")
    elif scores.negative > 1.0 - policy.uncertain_threshold:
        decision.flags.append("gate_uncertain:negative")
    mirror_threshold = DEFAULT_MIRRORED_THRESHOLD if policy.mirrored_threshold is None else policy.mirrored_threshold
    if scores.mirrored >= mirror_threshold:
        decision.flags.append("mirrored")
    return decision


CORRECTION_PREFIXES = ("orientation_corrected", "negative_corrected")


def review_flags(flags: Sequence[str]) -> list[str]:
    """The flags that make a result need review (a correction alone does not)."""
    return [f for f in flags if not f.startswith(CORRECTION_PREFIXES)]


# --- the gated segmentation ----------------------------------------------------------------------------
@dataclass
class Refused:
    """A radiograph the policy refused to segment."""

    code: str
    message: str
    decision: GateDecision


def gated_segment(predictor: Predictor, gate: GateModel | None, radiographs: Sequence[Radiograph],
                  config: PostprocessConfig | None = None, policy: GatePolicy | None = None,
                  shape_model: ShapeModel | None = None) -> list[Segmentation | Refused]:
    """Gate, correct, segment (one batch), QA and map back: a ``Segmentation`` or :class:`Refused` each.

    ``Segmentation.qa`` holds ``flags`` (all), ``review`` (those that need a human), ``gate`` (scores,
    decision) and the mask checks; the mask is on the stored pixel grid.
    """
    policy = policy or GatePolicy()
    if gate is not None:
        policy = gate.policy(policy)
    scores: list[GateScores | None] = [None] * len(radiographs)
    gate_ms = 0.0
    if gate is not None and policy.mode != "off" and radiographs:
        t0 = time.perf_counter()
        gate_batch = np.stack([gate_input_from_pixels(r.pixels) for r in radiographs])
        scores = list(gate.scores(gate_batch))
        gate_ms = (time.perf_counter() - t0) * 1000 / len(radiographs)
    decisions = [decide(s, getattr(r, "dataset", None), policy) for s, r in zip(scores, radiographs, strict=True)]
    todo = [i for i, d in enumerate(decisions) if d.refused is None]
    corrected = [_corrected(radiographs[i], decisions[i].correction) for i in todo]
    segmentations = segment_batch(predictor, corrected, config) if corrected else []
    results: list[Any] = [Refused(d.refused, d.refused_message, d) if d.refused else None for d in decisions]
    for i, seg in zip(todo, segmentations, strict=True):
        decision = decisions[i]
        t1 = time.perf_counter()
        qa = mask_qa(seg.final_mask, shape_model)
        flags = decision.flags + qa.pop("flags")
        if shape_model is None and policy.mode != "off":
            flags.append("shape_check_unavailable")
        if decision.correction.quarter_turns % 4:
            seg = _turned_back(seg, radiographs[i], decision.correction)
        seg.qa = {"flags": flags, "review": review_flags(flags), "gate": decision.to_dict(), **qa, **seg.qa}
        seg.timings_ms["gate"] = gate_ms
        seg.timings_ms["qa"] = (time.perf_counter() - t1) * 1000
        results[i] = seg
    return results


def _corrected(radiograph: Any, correction: Correction) -> Any:
    if not correction.any:
        return radiograph
    from dataclasses import replace

    native = getattr(radiograph, "native_shape", None)
    if native is not None and correction.quarter_turns % 2:
        native = (native[1], native[0])
    return replace(radiograph, pixels=correction.apply(radiograph.pixels), native_shape=native)


def _turned_back(seg: Any, radiograph: Any, correction: Correction) -> Any:
    """The segmentation of an upright-turned image, expressed on the stored image's grid."""
    rows, columns = radiograph.source_shape
    return Segmentation(final_mask=correction.undo_mask(seg.final_mask),
                        probability=correction.undo_mask(seg.probability),
                        geometry=Geometry.for_shape(rows, columns, seg.geometry.size),
                        timings_ms=seg.timings_ms, qa=seg.qa, threshold=seg.threshold)


# --- the policy of the gate settings (lungseg.gate_options) -------------------------------------------------
def policy_from_settings(settings: Any) -> GatePolicy:
    """The policy of gate settings: a :class:`lungseg.gate_options.GateOptions` (an ``EdgeConfig`` is one) or
    flags parsed after :func:`lungseg.gate_options.add_gate_arguments`. Raises ``ValueError`` when invalid."""
    return GatePolicy(mode=settings.gate, auto_orient=bool(settings.auto_orient),
                      correct_threshold=settings.gate_correct_threshold,
                      uncertain_threshold=settings.gate_uncertain_threshold,
                      mirrored_threshold=settings.gate_mirror_threshold,
                      not_chest_refuse=max(settings.gate_refuse_threshold, GatePolicy().not_chest_flag))


_WORDS = {
    "orientation_corrected": "image was rotated: turned {} deg counter-clockwise before segmenting",
    "negative_corrected": "image was a negative: inverted before segmenting",
    "orientation_suspect": "image may need turning {} deg counter-clockwise",
    "gate_uncertain": "gate unsure of {}",
    "negative_suspect": "image may be a negative",
    "mirrored": "image looks mirrored left-right",
    "not_chest": "may not be a frontal chest radiograph",
    "body_part": "header body part {}",
    "lateral_view": "header view {}",
    "gate_unavailable": "image gate unavailable",
    "shape_check_unavailable": "shape check unavailable",
    "not_two_lungs": "mask is not two lungs",
    "lung_size_asymmetry": "lung sizes very unequal",
    "implausible_area": "implausible lung area",
    "implausible_shape": "lung shape unlike training masks",
    "lung_apex_mismatch": "lung tops at very different heights",
    "pixel_spacing_implausible": "pixel spacing implausible for a chest: areas unreliable",
}


def flag_words(flag: str) -> str:
    """A flag code in words, for the overlay (ASCII)."""
    code, _, value = flag.partition(":")
    template = _WORDS.get(code)
    if template is None:
        return flag.replace("_", " ")
    return template.format(value) if "{}" in template else template
