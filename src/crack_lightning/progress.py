"""Progress that suits where the output goes: a live bar on a terminal, a short line every
so many seconds in a log file (CI, SLURM, nohup, tee), where a bar writes a line per step."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
# seconds between progress lines when the output is not a terminal
LINE_EVERY_S = 30.0


def interactive() -> bool:
    """Whether output goes to a terminal: Lightning's bars write to stdout, tqdm's to
    stderr, so both must be (`train.py | tee log` pipes stdout only)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class LineProgress:
    """tqdm's update() and context protocol, reporting by log lines: one every `every_s`
    seconds and one at the end."""

    def __init__(self, total: int, desc: str, unit: str, every_s: float) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.count = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.report(now)

    def report(self, now: float) -> None:
        seconds = max(now - self.start, 1e-9)
        log.info(
            "%s: %d/%d %s (%.0f%%), %.1f %s/s, %.0f s",
            self.desc,
            self.count,
            self.total,
            self.unit,
            100.0 * self.count / max(self.total, 1),
            self.count / seconds,
            self.unit,
            seconds,
        )

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.report(time.monotonic())


def progress(total: int, desc: str, unit: str = "img") -> tqdm | LineProgress:
    """A tqdm bar on a terminal, otherwise a LineProgress."""
    if interactive():
        return tqdm(total=total, desc=desc, unit=unit)
    return LineProgress(total, desc, unit, LINE_EVERY_S)
