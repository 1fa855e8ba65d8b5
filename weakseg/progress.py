"""Progress display shared by the steps: rich bars on a terminal, a line per 10 % elsewhere."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not enabled or not sys.stderr.isatty(),
    )
    with progress:
        yield progress


def duration_text(seconds: float) -> str:
    """'2m05s'."""
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class StepProgress:
    """The progress callback a step receives: ``progress(i, n)`` after each unit of work (a
    training step, an image) and ``progress.note(text)`` for a line worth keeping (one per
    training epoch: losses, images/s, ETA). On a terminal, a bar of `bars`; elsewhere (a log
    file, CI, a batch job) one line per 10 % of the work, so a long step is never silent.
    Notes are printed in both cases."""

    def __init__(self, bars: Progress, name: str):
        self.bars, self.name = bars, name
        self.task = None
        self.interactive = not bars.disable
        self.started = time.perf_counter()
        self.reported = 0  # tenths reported so far

    def __call__(self, done: int, total: int | None) -> None:
        if self.interactive:
            if self.task is None:
                self.task = self.bars.add_task(self.name, total=total)
            self.bars.update(self.task, completed=done, total=total)
            return
        if not total:
            return
        tenths = min(10, int(10 * done / total))
        if tenths > self.reported:
            self.reported = tenths
            elapsed = time.perf_counter() - self.started
            eta = elapsed * (total - done) / max(done, 1)
            self.line(f"{10 * tenths}% ({done}/{total}), {duration_text(elapsed)} elapsed, ETA {duration_text(eta)}")

    def note(self, text: str) -> None:
        self.line(text)

    def line(self, text: str) -> None:
        console.print(f"{self.name}: {text}", markup=False, highlight=False, soft_wrap=True)
