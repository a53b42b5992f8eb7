"""The image gate's settings, declared once for ``lungseg-segment``, ``lungseg-edge run`` and its TOML file.

:class:`GateOptions` holds them (``lungseg.edge_runtime.config.EdgeConfig`` extends it);
:func:`add_gate_arguments` offers them as flags, one syntax everywhere (``--gate MODE``,
``--auto-orient/--no-auto-orient``, ``--gate-*-threshold P``); :func:`lungseg.gate.policy_from_settings`
turns them into the gate's policy. Standard library only, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

from lungseg.settings_schema import add_arguments, setting

GATE_MODES = ("off", "flag", "refuse")
DEFAULT_MIRRORED_THRESHOLD = 0.9  # for a gate whose gate.json carries no calibrated threshold
SECTION = "Image gate"
ABOUT = ("Checks that each image is a frontal chest radiograph, upright and not a negative, before segmenting "
         "(see lungseg.gate). Needs gate.onnx + shape_model.npz in the model bundle; without them every result "
         "is flagged gate_unavailable.")


def _unit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], not {text}")
    return value


@dataclass
class GateOptions:
    """What the image gate does; defaults are the safe ones (``lungseg.gate.GatePolicy``'s)."""

    gate: str = field(default="refuse", metadata=setting(
        section=SECTION, choices=GATE_MODES,
        help="image gate: off (no checks), flag (segment everything, flag doubtful images) or refuse (also refuse "
        "non-chest images and header-declared non-chest body parts / lateral views; the edge quarantines them)"))
    auto_orient: bool = field(default=True, metadata=setting(
        section=SECTION,
        help="correct confidently detected quarter turns and negatives before segmenting, and say so in the "
        "outputs' flags"))
    gate_correct_threshold: float = field(default=0.9, metadata=setting(
        section=SECTION, commented=True, metavar="P", parse=_unit,
        help="gate probability needed to correct orientation / negative"))
    gate_uncertain_threshold: float = field(default=0.7, metadata=setting(
        section=SECTION, commented=True, metavar="P", parse=_unit,
        help="top probability below which a gate head is not confident: the image is flagged"))
    gate_mirror_threshold: float | None = field(default=None, metadata=setting(
        section=SECTION, commented=True, metavar="P", parse=_unit, sample=DEFAULT_MIRRORED_THRESHOLD,
        default_text=f"the bundle's calibrated value, from its gate.json; {DEFAULT_MIRRORED_THRESHOLD} without one",
        help="P(mirrored) above which an image is flagged"))
    gate_refuse_threshold: float = field(default=0.9, metadata=setting(
        section=SECTION, commented=True, metavar="P", parse=_unit,
        help="P(not a chest) above which an image is refused (gate refuse)"))

def add_gate_arguments(parser: argparse.ArgumentParser, *, unset: bool = False) -> argparse._ArgumentGroup:
    """Add the gate flags as their own group; ``unset``: defaults ``None`` (a config file may set them)."""
    group = parser.add_argument_group(SECTION.lower(), textwrap.fill(ABOUT, 78))
    add_arguments(group, GateOptions, unset=unset)
    return group


def legacy_auto_orient(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` with the old ``--auto-orient on|off`` as ``--auto-orient`` / ``--no-auto-orient``; whether found.

    lungseg-segment took ``--auto-orient on|off`` up to 0.1; accepted (with a warning) for one more release.
    """
    out: list[str] = []
    found = False
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item == "--":
            out += items[i:]
            break
        value = None
        if item.startswith("--auto-orient="):
            value = item.split("=", 1)[1]
        elif item == "--auto-orient" and i + 1 < len(items) and items[i + 1] in ("on", "off"):
            value = items[i + 1]
            i += 1
        if value is None:
            out.append(item)
        else:
            found = True
            out.append("--no-auto-orient" if value == "off" else "--auto-orient")
        i += 1
    return out, found
