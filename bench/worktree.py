"""A git revision checked out beside this tree for the length of an A/B benchmark (bench/train_step.py,
bench/decode.py --rev): a command run with it as its working directory imports that revision's seqtool."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def checked_out(rev: str) -> Iterator[Path]:
    """A detached worktree of `rev`, removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=ROOT, check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)


def short(rev: str) -> str:
    """The abbreviated commit id of `rev`, for a table's label."""
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True).stdout.strip()
