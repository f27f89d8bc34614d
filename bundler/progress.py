"""Progress of long steps: a live spinner on a terminal, plain lines in logs and image builds.

rich does the terminal part (spinners, elapsed time, tables) far better than
hand-written escape codes, and degrades to plain text when output is not a
terminal, which is what CI logs and image builds (Yocto, Buildroot) need.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console


@dataclass
class StepRecord:
    name: str
    seconds: float = 0.0
    cached: bool = False
    detail: str = ""


@dataclass
class Step:
    record: StepRecord

    def done(self, *, cached: bool = False, detail: str = "") -> None:
        self.record.cached = cached
        self.record.detail = detail


@dataclass
class Progress:
    """Reports steps to stderr. ``quiet`` silences it (the API's default)."""

    quiet: bool = False
    console: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return not self.quiet and self.console.is_terminal

    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        rec = StepRecord(name)
        self.steps.append(rec)
        start = time.monotonic()
        if self.quiet:
            yield Step(rec)
        elif self.live:
            with self.console.status(f"{name} ..."):
                yield Step(rec)
        else:
            print(f"==> {name} ...", file=sys.stderr, flush=True)
            yield Step(rec)
        rec.seconds = time.monotonic() - start
        if not self.quiet:
            how = "cached" if rec.cached else f"{rec.seconds:.1f} s"
            extra = f": {rec.detail}" if rec.detail else ""
            mark = "[green]✓[/green]" if self.live else "   done"
            self.console.print(f"{mark} {name} ({how}){extra}", markup=self.live, soft_wrap=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, soft_wrap=True)
