"""Count imports placed inside functions, and those of the project's own modules.

usage: python tests/tools/count_function_imports.py [-v]   (-v lists each own-module one with its comment)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("lungseg", "train", "export", "edge_runtime", "benchmarks")


def function_imports(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, imported module, is the project's own)`` of every import inside a function of ``path``."""
    tree = ast.parse(path.read_text())
    seen: set[int] = set()
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                own = node.level > 0 or module.split(".")[0] == "lungseg"
            else:
                module = ", ".join(a.name for a in node.names)
                own = any(a.name.split(".")[0] == "lungseg" for a in node.names)
            found.append((node.lineno, module, own))
    return found


def main(argv: list[str]) -> int:
    total = own = 0
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = path.read_text().splitlines()
            for line, module, is_own in function_imports(path):
                total += 1
                if is_own:
                    own += 1
                    if "-v" in argv:
                        text = lines[line - 1]
                        why = text.split("#", 1)[1].strip() if "#" in text else ""
                        print(f"{path.relative_to(ROOT)}:{line}: {module}  # {why}")
    print(f"function-level imports: {total}; of the project's own modules: {own}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
