"""Regenerate the README's Performance section from a committed benchmark JSON.

``python -m lungseg.benchmarks.readme docs/benchmarks/cpu.json README.md`` replaces
everything between the ``<!-- performance:start -->`` and ``<!-- performance:end -->``
markers, so every number in the README comes from a real, committed run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .report import _sections

START = "<!-- performance:start -->"
END = "<!-- performance:end -->"


def performance_section(result: dict[str, Any], source: str) -> str:
    """The Markdown between the markers for one benchmark result."""
    out = [f"Generated from `{source}` (`lungseg-bench`, created {result['created']}).", ""]
    for title, lines in _sections(result, markdown=True):
        out += [f"### {title}", "", *(line if line.startswith("|") else line + "  " for line in lines), ""]
    return "\n".join(out).rstrip() + "\n"


def splice(readme: str, section: str) -> str:
    """``readme`` with the text between the markers replaced by ``section``."""
    head, found, rest = readme.partition(START)
    if not found or END not in rest:
        raise ValueError(f"README has no {START} ... {END} block")
    return f"{head}{START}\n{section}{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m lungseg.benchmarks.readme BENCH_JSON README_MD", file=sys.stderr)
        return 2
    source, readme = Path(args[0]), Path(args[1])
    section = performance_section(json.loads(source.read_text()), source.as_posix())
    readme.write_text(splice(readme.read_text(), section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
