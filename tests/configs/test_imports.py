"""lipdeq.configs and lipdeq.models import each other's names: every import order must work."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("first", ["import lipdeq.configs", "import lipdeq.models"])
def test_import_order(first: str) -> None:
    code = "\n".join(
        [first, "from lipdeq.configs import load_config", "print(load_config('mdeq_tiny').preset)"]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "mdeq_tiny"
