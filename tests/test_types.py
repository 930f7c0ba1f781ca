"""The type checker, as CI runs it: mypy over dcgan/ and launch/ with the settings in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def run_mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_the_package_type_checks() -> None:
    result = run_mypy()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found")


def test_the_settings_catch_a_wrong_return_type(tmp_path: Path) -> None:
    """The check is strict enough to matter: a function that returns a str where it promises an int fails."""
    bad = tmp_path / "bad.py"
    bad.write_text("def steps() -> int:\n    return 'ten'\n")
    result = run_mypy("--config-file", str(ROOT / "pyproject.toml"), str(bad))
    assert result.returncode == 1 and "Incompatible return value type" in result.stdout
