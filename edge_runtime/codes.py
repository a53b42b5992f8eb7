"""The edge runtime's vocabulary: outcome statuses, reason codes and QA flag codes, as enums.

Each is a ``str`` enum (``class X(str, Enum)``, not ``enum.StrEnum``: Python 3.10 is
supported), so a member *is* its serialised value: it compares equal to it, hashes like it,
and is written as it to JSON, SQLite, logs and metrics labels. ``str()`` and f-strings give
the value on every Python version.

* :class:`Status`            what happened to one input file (:class:`~lungseg.edge_runtime.admission.Outcome`)
* :class:`QuarantineReason`  why an input was quarantined (the reason file's and the ledger's ``code``);
                             the decoder's own codes (:mod:`lungseg.dicom_decode`) pass through as text
* :class:`RetryReason`       why a file is looked at again later (``retry`` outcomes)
* :class:`SkipReason`, :class:`DuplicateReason`  the codes of ``skipped`` and ``duplicate`` outcomes
* :class:`QAFlag`            the code of a QA flag (the text before ``:`` in ``orientation_corrected:90``)
"""

from __future__ import annotations

from enum import Enum


class _Code(str, Enum):
    """A ``str`` enum whose ``str()`` and ``format()`` are the value (as ``StrEnum``'s are)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, format_spec: str) -> str:
        return format(str(self.value), format_spec)


class Status(_Code):
    """The outcome of one candidate file (see :mod:`lungseg.edge_runtime.admission`)."""

    DONE = "done"
    DUPLICATE = "duplicate"
    SEEN = "seen"
    QUARANTINED = "quarantined"
    RETRY = "retry"
    ABANDONED = "abandoned"
    VANISHED = "vanished"
    SKIPPED = "skipped"


class QuarantineReason(_Code):
    """Reason codes the edge itself gives a quarantined input."""

    FILE_TOO_LARGE = "file_too_large"
    PROCESSING_CRASH = "processing_crash"
    MISSING_UID = "missing_uid"
    INVALID_UID = "invalid_uid"
    INFERENCE_ERROR = "inference_error"
    OUTPUT_ERROR = "output_error"
    REFUSED_BODY_PART = "refused_body_part"
    REFUSED_LATERAL_VIEW = "refused_lateral_view"
    REFUSED_NOT_CHEST = "refused_not_chest"
    DECODER_CRASH = "decoder_crash"
    DECODER_TIMEOUT = "decoder_timeout"
    DECODER_OOM = "decoder_oom"
    DECODE_ERROR = "decode_error"

    @classmethod
    def refused(cls, gate_code: str) -> str:
        """``refused_<kind>`` for a gate refusal code ``<kind>:<value>`` (the text itself for a kind
        the image gate may add later: a refusal is never lost to an unknown kind)."""
        code = f"refused_{gate_code.split(':')[0]}"
        try:
            return cls(code)
        except ValueError:
            return code


class RetryReason(_Code):
    """Why a file was not decided now; the first group are faults of the box (``transient``)."""

    ADMIT_FAILED = "admit_failed"
    OUT_OF_MEMORY = "out_of_memory"
    WRITE_FAILED = "write_failed"
    QUARANTINE_FAILED = "quarantine_failed"
    DECODER_UNAVAILABLE = "decoder_unavailable"
    # looked at again, not faults
    CHANGED = "changed"
    UNSETTLED = "unsettled"
    SAME_CONTENT_IN_BATCH = "same_content_in_batch"
    SAME_UID_IN_BATCH = "same_uid_in_batch"
    SUSPECT_WAITS = "suspect_waits"
    SUSPECT_WAITS_TO_GO_ALONE = "suspect_waits_to_go_alone"
    BEHIND_A_SUSPECT = "behind_a_suspect"


class SkipReason(_Code):
    NOT_REGULAR_FILE = "not_regular_file"


class DuplicateReason(_Code):
    SAME_CONTENT = "same_content"  # the same bytes already handled (a duplicate UID has no code)


class QAFlag(_Code):
    """The QA flag codes :func:`lungseg.gate.gated_segment` and :func:`lungseg.plausibility.mask_qa` raise.

    A flag is its code, or ``<code>:<value>`` (``orientation_corrected:90``, ``body_part:HAND``).
    """

    ORIENTATION_CORRECTED = "orientation_corrected"
    NEGATIVE_CORRECTED = "negative_corrected"
    ORIENTATION_SUSPECT = "orientation_suspect"
    GATE_UNCERTAIN = "gate_uncertain"
    NEGATIVE_SUSPECT = "negative_suspect"
    MIRRORED = "mirrored"
    NOT_CHEST = "not_chest"
    BODY_PART = "body_part"
    LATERAL_VIEW = "lateral_view"
    GATE_UNAVAILABLE = "gate_unavailable"
    SHAPE_CHECK_UNAVAILABLE = "shape_check_unavailable"
    NOT_TWO_LUNGS = "not_two_lungs"
    LUNG_SIZE_ASYMMETRY = "lung_size_asymmetry"
    IMPLAUSIBLE_AREA = "implausible_area"
    IMPLAUSIBLE_SHAPE = "implausible_shape"
    LUNG_APEX_MISMATCH = "lung_apex_mismatch"
    PIXEL_SPACING_IMPLAUSIBLE = "pixel_spacing_implausible"  # lungseg.spacing_check: the areas are unreliable

    @classmethod
    def of(cls, flag: str) -> QAFlag | None:
        """The code of a flag (``None`` for one outside this vocabulary)."""
        try:
            return cls(flag.partition(":")[0])
        except ValueError:
            return None

    @property
    def is_correction(self) -> bool:
        """A correction the gate applied (said in the outputs, but no reason for review by itself)."""
        return self in (QAFlag.ORIENTATION_CORRECTED, QAFlag.NEGATIVE_CORRECTED)


__all__ = ["DuplicateReason", "QAFlag", "QuarantineReason", "RetryReason", "SkipReason", "Status"]
