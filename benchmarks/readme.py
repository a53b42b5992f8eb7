"""Publish one ``lungseg-bench`` run: ``docs/benchmarks/`` and the README's performance section.

``make bench`` writes a run to an output folder; publishing it is this separate, explicit step
(``make bench-publish``)::

    python -m lungseg.benchmarks.readme --json bench-output/cpu.json --docs docs/benchmarks --readme README.md

copies the run's JSON into ``--docs`` as ``cpu.json``, writes ``cpu.md`` and ``latency.png``
there from it, and replaces everything between the ``<!-- performance:start -->`` and
``<!-- performance:end -->`` markers of ``--readme`` with the run's tables, citing the JSON by
its path relative to the README. Every path is given on the command line; nothing is looked up
from where lungseg is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from .report import _sections, latency_plot, markdown_report, upgraded

START = "<!-- performance:start -->"
END = "<!-- performance:end -->"
DOCS_JSON, DOCS_MARKDOWN, DOCS_PLOT = "cpu.json", "cpu.md", "latency.png"
EXIT_OK, EXIT_USAGE = 0, 2


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


def publish(source: Path, readme: Path | None, docs: Path | None) -> list[Path]:
    """Write the docs folder and the README section from the result JSON ``source``; returns the files written."""
    text = source.read_text()
    result = json.loads(text)
    written = []
    cited = source
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        cited = docs / DOCS_JSON
        if cited.resolve() != source.resolve():
            cited.write_text(text)
        (docs / DOCS_MARKDOWN).write_text(markdown_report(result) + "\n")
        latency_plot(result, docs / DOCS_PLOT)
        written += [cited, docs / DOCS_MARKDOWN, docs / DOCS_PLOT]
    if readme is not None:
        relative = Path(os.path.relpath(cited.resolve(), readme.resolve().parent)).as_posix()
        readme.write_text(splice(readme.read_text(), performance_section(result, relative)))
        written.append(readme)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lungseg.benchmarks.readme",
        description="Publish a lungseg-bench result: copy its JSON into --docs with a Markdown report and the "
        "latency plot, and regenerate the performance section of --readme (between its markers).",
        epilog=f"exit codes: {EXIT_OK} written; {EXIT_USAGE} usage error (missing file, README without markers)",
    )
    parser.add_argument("--json", type=Path, required=True, metavar="PATH", help="the lungseg-bench --json result")
    parser.add_argument("--readme", type=Path, default=None, metavar="README",
                        help="README whose performance section is regenerated")
    parser.add_argument("--docs", type=Path, default=None, metavar="DIR",
                        help=f"folder for {DOCS_JSON}, {DOCS_MARKDOWN} and {DOCS_PLOT} (the README then cites "
                        f"DIR/{DOCS_JSON})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.readme is None and args.docs is None:
        parser.error("nothing to publish: give --readme, --docs or both")
    if not args.json.is_file():
        parser.error(f"--json {args.json}: no such file (run `make bench` or lungseg-bench --json first)")
    if args.docs is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error(f"--docs writes {DOCS_PLOT}, which needs matplotlib (the [train] extra)")
    if args.readme is not None and (not args.readme.is_file() or START not in args.readme.read_text()):
        parser.error(f"--readme {args.readme}: no such file, or no {START} ... {END} block in it")
    for path in publish(args.json, args.readme, args.docs):
        print(f"wrote {path}")
    verdict = upgraded(json.loads(args.json.read_text()))["verdict"]
    if not verdict["passed"]:
        print(f"note: the published run's verdict is FAILED ({json.dumps(verdict)})", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
