"""Training progress on stderr: a rich bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """quiet: errors only; verbose: a plain log line every 10 steps instead of the bar."""

    def __init__(self, quiet: bool = False, verbose: bool = False):
        self.console = Console(stderr=True, highlight=False)  # rich honours NO_COLOR and TERM=dumb
        self.quiet = quiet
        self.log_every = 10 if verbose else 100
        self.bar: Optional[Progress] = None
        self.task: Optional[TaskID] = None
        if sys.stderr.isatty() and not quiet and not verbose:
            self.bar = Progress(
                TextColumn("step {task.completed}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self.task = self.bar.add_task("train", total=None, stats="")
            self.bar.start()
        self._last_log = time.monotonic()

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, soft_wrap=True)  # a long line stays one line in a log file

    def step(self, step: int, stats: str) -> None:
        if self.bar is not None:
            assert self.task is not None  # added together with the bar
            self.bar.update(self.task, completed=step, stats=stats)
        elif step % self.log_every == 0:
            self.log(f"step {step} {stats}")

    def set_total(self, total: Optional[int]) -> None:
        if self.bar is not None:
            assert self.task is not None  # added together with the bar
            self.bar.update(self.task, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class LineProgress:
    """`translate` of a file of `total` lines: a rich bar with lines/s and the ETA while stderr is a terminal,
    or with `plain` (-v, stderr not a terminal) a log line every `every` seconds. Called once per line
    written, as translate_stream's `each`."""

    def __init__(self, total: int, plain: bool, every: float = 10.0):
        self.total, self.every, self.done = total, every, 0
        self.console = Console(stderr=True, highlight=False)
        self.start = self.last = time.monotonic()
        self.bar: Optional[Progress] = None
        if not plain:
            self.bar = Progress(TextColumn("{task.completed:,}/{task.total:,} lines"), BarColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=self.console, transient=True)
            self.task = self.bar.add_task("translate", total=total, rate="")
            self.bar.start()

    def __call__(self, lineno: int, translation: object = None) -> None:
        self.done += 1
        now = time.monotonic()
        rate = self.done / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{rate:,.1f} lines/s")
        elif now - self.last >= self.every:
            self.last = now
            self.console.print(f"translated {self.done:,} of {self.total:,} lines ({rate:,.1f} lines/s, ETA "
                               f"{max(self.total - self.done, 0) / rate:.0f} s)", markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
