"""mypy over the packages pyproject.toml's [tool.mypy] names (captioning/models, decoding, metrics at least): the
type hints that are there hold. Its cache is .mypy_cache (git-ignored); a cold run takes tens of seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.lint
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mypy_passes_on_the_configured_packages():
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=580)
    if "No module named mypy" in result.stderr:
        pytest.fail("mypy is not installed: pip install -e '.[test]'")
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "Success: no issues found" in result.stdout
