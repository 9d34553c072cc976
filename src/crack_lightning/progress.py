"""The one progress style: a live bar on a terminal, a short line every so many seconds
in a log file (CI, SLURM, nohup, tee), where a bar writes a line per step.

Long work outside training uses `progress` (a bar to update) or `track` (an iterable);
training uses training/callbacks.py's `progress_bar`, a Lightning callback of the same
style (`interactive` decides for both). This is the only module that imports tqdm.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")
# seconds between progress lines when the output is not a terminal, for the work outside
# training (tools have no callbacks config); training takes
# callbacks.progress_bar.line_every_s from conf/callbacks/default.yaml
LINE_EVERY_S = 30.0


def duration(seconds: float) -> str:
    """ "40 s", "3 min", "1.5 h": a time estimate as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def interactive() -> bool:
    """Whether output goes to a terminal: Lightning's bars write to stdout, tqdm's to
    stderr, so both must be (`train.py | tee log` pipes stdout only)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class LineProgress:
    """tqdm's update()/close() and context protocol, reporting by log lines: one every
    `every_s` seconds and one at the end; silent when not `enabled`."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        every_s: float,
        initial: int = 0,
        enabled: bool = True,
    ) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.count = initial
        self.enabled = enabled
        self.closed = False
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.report(now)

    def report(self, now: float) -> None:
        if not self.enabled:
            return
        seconds = max(now - self.start, 1e-9)
        share = f" ({100.0 * self.count / self.total:.0f}%)" if self.total else ""
        log.info(
            "%s: %d/%s %s%s, %.1f %s/s, %.0f s",
            self.desc,
            self.count,
            self.total if self.total is not None else "?",
            self.unit,
            share,
            self.count / seconds,
            self.unit,
            seconds,
        )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.report(time.monotonic())

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def progress(
    total: int | None,
    desc: str,
    unit: str = "img",
    enabled: bool = True,
    initial: int = 0,
    every_s: float = LINE_EVERY_S,
) -> Any:
    """A tqdm bar on a terminal, otherwise a LineProgress; both silent unless `enabled`.
    Byte counts (unit="B") are shown scaled (KiB, MiB) on a terminal."""
    if interactive():
        scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
        return tqdm(
            total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, **scale
        )
    return LineProgress(total, desc, unit, every_s, initial, enabled)


def track(
    items: Iterable[T],
    desc: str,
    unit: str = "img",
    enabled: bool = True,
    total: int | None = None,
) -> Iterator[T]:
    """Iterate `items` with progress (one step per item)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with progress(total, desc, unit, enabled) as bar:
        for item in items:
            yield item
            bar.update(1)
