"""docs/FAULTS.md stays true: every test a row names exists, and every row names one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_fault_row_names_an_existing_test():
    text = (ROOT / "docs" / "FAULTS.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Fault")]
    assert len(rows) > 50  # the file has about a hundred rows: a parse that finds few is broken
    missing = []
    for row in rows:
        refs = re.findall(r"(tests/[\w/]+\.py)::(\w+)", row)
        assert refs, f"a row of docs/FAULTS.md names no test: {row[:100]}"
        for file, function in refs:
            path = ROOT / file
            names = {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                     if isinstance(n, ast.FunctionDef)} if path.is_file() else set()
            if function not in names:
                missing.append(f"{file}::{function}")
    assert not missing, f"docs/FAULTS.md names tests that do not exist: {missing}"
