"""Progress of long steps: a live spinner on a terminal, plain lines in logs and image builds.

rich does the terminal part (spinners, elapsed time, tables) far better than
hand-written escape codes, and degrades to plain text when output is not a
terminal, which is what CI logs and image builds (Yocto, Buildroot) need.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.text import Text


@dataclass
class StepRecord:
    name: str
    seconds: float = 0.0
    cached: bool = False
    detail: str = ""


@dataclass
class Step:
    record: StepRecord
    _show: Callable[[str], None] | None = None
    _last_plain: float = 0.0

    def done(self, *, cached: bool = False, detail: str = "") -> None:
        self.record.cached = cached
        self.record.detail = detail

    def update(self, text: str, fraction: float | None = None) -> None:
        """Where a long step is ("[120/341] runtime/vm/executable.cc"): redrawn on a terminal,
        a plain line at most every 10 s in logs (image builds must not drown in it)."""
        if self._show is None:
            return
        now = time.monotonic()
        if self._show is _plain:
            if now - self._last_plain < 10 and fraction != 1.0:
                return
            self._last_plain = now
        pct = f"{fraction:4.0%} " if fraction is not None else ""
        self._show(f"{self.record.name}: {pct}{text}")


def _plain(text: str) -> None:
    print(f"    {text}", file=sys.stderr, flush=True)


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
            with self.console.status(f"{name} ...") as status:
                yield Step(rec, lambda text: status.update(Text(text)))
        else:
            print(f"==> {name} ...", file=sys.stderr, flush=True)
            yield Step(rec, _plain, time.monotonic())
        rec.seconds = time.monotonic() - start
        if not self.quiet:
            how = "cached" if rec.cached else f"{rec.seconds:.1f} s"
            extra = f": {rec.detail}" if rec.detail else ""
            mark = "[green]✓[/green]" if self.live else "   done"
            self.console.print(f"{mark} {name} ({how}){extra}", markup=self.live, soft_wrap=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, soft_wrap=True)
