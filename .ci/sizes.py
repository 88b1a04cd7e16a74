#!/usr/bin/env python3
"""Report what the house issue bounds: functions over 60 lines and constructors (``__init__``
or a dataclass) over 12 parameters in recsys_hnm/. A comment block starting ``# size: <why>`` right above
the ``def`` or ``class`` marks one as kept on purpose. Prints one line each; exits 1 if any is
unmarked and ``--check`` is given."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES, MAX_PARAMS = 60, 12
ROOT = Path(__file__).resolve().parent.parent / "recsys_hnm"


def n_params(args: ast.arguments) -> int:
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def marked(lines: list[str], node: ast.AST) -> bool:
    at = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 2
    while at >= 0 and lines[at].strip().startswith("#"):  # the comment block right above
        if lines[at].strip().startswith("# size:"):
            return True
        at -= 1
    return False


def report() -> list[tuple[str, bool]]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        rel = path.relative_to(ROOT.parent)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    found.append((f"{rel}:{node.lineno} {node.name}: {length} lines", marked(lines, node)))
                if node.name == "__init__" and n_params(node.args) > MAX_PARAMS:
                    found.append((f"{rel}:{node.lineno} __init__: {n_params(node.args)} parameters", marked(lines, node)))
            elif isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                fields = [s for s in node.body if isinstance(s, ast.AnnAssign)]
                if len(fields) > MAX_PARAMS:
                    found.append((f"{rel}:{node.lineno} {node.name} (dataclass): {len(fields)} fields", marked(lines, node)))
    return found


if __name__ == "__main__":
    rows = report()
    for line, ok in rows:
        print(("kept  " if ok else "over  ") + line)
    sys.exit(1 if "--check" in sys.argv and any(not ok for _, ok in rows) else 0)
