"""The code style is checked, not hoped for: ruff's lint rules and formatter (configured in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).is_file() and shutil.which(exe) is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    done = ruff("check", "domainprune", "tests", "bench")
    assert done.returncode == 0, done.stdout[-4000:]


def test_ruff_format_is_clean():
    done = ruff("format", "--check", "domainprune", "tests", "bench")
    assert done.returncode == 0, done.stdout[-4000:]
