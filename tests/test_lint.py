"""ruff over the whole tree, lint and format, as configured in pyproject.toml ([tool.ruff]): run by the README's
test command, so CI fails on a lint finding or an unformatted file (`ruff format . && ruff check --fix .` fixes most).
`-m "not lint"` deselects it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if "No module named ruff" in result.stderr:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    return result


@pytest.mark.lint
def test_ruff_check_passes_on_the_tree():
    result = ruff("check", "--output-format", "concise", "--no-cache", ".")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]


@pytest.mark.lint
def test_ruff_format_leaves_the_tree_unchanged():
    result = ruff("format", "--check", "--no-cache", ".")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
