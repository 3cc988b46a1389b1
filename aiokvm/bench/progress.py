"""Progress for a run of measurements, with an ETA, on stderr (rich).

Benchmarks know how many measurements they will make; ``Steps`` shows how
many are done, the one running, the time so far and an estimate of what is
left.  On a terminal it is a live bar; otherwise (CI logs, pipes) it writes
one line per step, so a log still says where a run was.
"""

from __future__ import annotations

import sys
import time


class Steps:
    def __init__(self, total: int, title: str) -> None:
        self.total = max(int(total), 1)
        self.title = title
        self.done = 0
        self._progress = None
        self._task = None
        self._started = 0.0

    def __enter__(self) -> Steps:
        self._started = time.monotonic()
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                      console=Console(stderr=True), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.title, total=self.total)
        return self

    def step(self, label: str) -> None:
        """One measurement finished."""
        self.done += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=f"{self.title}: {label}")
            return
        elapsed = time.monotonic() - self._started
        eta = elapsed / self.done * (self.total - self.done)
        print(f"# {self.title}: {self.done}/{self.total} {label} ({elapsed:.0f} s, eta {eta:.0f} s)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
