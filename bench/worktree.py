"""A git revision checked out beside this tree for the length of an A/B benchmark (bench/train_step.py,
bench/decode.py --rev): a command run with it as its working directory imports that revision's seqtool."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


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


def in_turn(pair: Sequence[T], round_: int) -> Sequence[T]:
    """The two sides of an A/B in the order round `round_` runs them: swapped every other round, so neither
    side always runs first (the order alone once showed up as a 3-5% difference between equal trees)."""
    return pair if round_ % 2 == 0 else pair[::-1]
