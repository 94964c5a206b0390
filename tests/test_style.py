"""The code's habits: the lint rules in pyproject.toml ([tool.ruff]) hold on the package, the benches and the tests,
and the package type-checks ([tool.mypy])."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]' brings it)")
def test_ruff_finds_nothing():
    proc = subprocess.run(["ruff", "check", "--no-cache", "seqtool", "bench", "tests"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("mypy") is None, reason="mypy is not installed (pip install -e '.[test]' brings it)")
def test_mypy_finds_nothing():
    proc = subprocess.run(["mypy", "--no-incremental"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
