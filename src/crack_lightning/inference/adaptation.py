"""The inspector's page adapting its model from its marks ("Adapt from marks",
docs/app.md): the ordinary `train.py experiment=adapt` run in a separate process in the
background, its output in a log file in its own run folder under labels_dir, read back
for the page's progress line. One adaptation at a time per page; it is stopped when the
page's process ends.
"""

from __future__ import annotations

import atexit
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from crack_lightning.progress import duration

# labels_dir/adapted/RUN: the runs the page started (beside the window_SIZE mark folders,
# so a site never reads them)
ADAPTED_DIR = "adapted"
LOG_NAME = "adapt.log"
BEST_CHECKPOINT = Path("checkpoints") / "best.ckpt"
# train.py's command (commands/train.py), run with the page's own Python
TRAIN = ("-m", "crack_lightning.commands.train")
# a Hydra log line's prefix: [2024-05-01 10:00:00,123][crack_lightning.x][INFO] -
LOG_PREFIX = re.compile(r"^\[[^]]*\]\[[^]]*\]\[(\w+)\] - ")
TAIL_BYTES = 16384  # the end of the log that holds its last lines
STOP_WAIT_S = 10
# characters a Hydra override's value may hold unquoted
PLAIN_VALUE = re.compile(r"[\w./:+-]+")


def override(key: str, value: str | Path) -> str:
    """`key=value` for Hydra's command line, the value quoted where it holds characters
    Hydra's grammar reads (spaces, commas, brackets, quotes: a folder's name)."""
    text = str(value)
    if PLAIN_VALUE.fullmatch(text):
        return f"{key}={text}"
    return f"{key}='{text.replace(chr(39), chr(92) + chr(39))}'"


def adapt_command(
    init_from: Path,
    site: Path,
    window: tuple[int, int],
    out: Path,
    data_dir: Path,
    extra: Sequence[str] = (),
) -> list[str]:
    """`python -m crack_lightning.commands.train experiment=adapt ...`: the site's
    masked photos tiled at the page's window, every file the run writes under `out`
    (the feature cache included), `extra` (the page's adapt_settings) last."""
    patch, stride = window
    return [
        sys.executable,
        *TRAIN,
        "experiment=adapt",
        override("init_from", init_from.absolute()),
        override("data.sources.site.root", site.absolute()),
        f"data.sources.site.tile_size={patch}",
        f"data.sources.site.stride={stride}",
        override("paths.output_dir", out.absolute()),
        override("paths.data_dir", data_dir.absolute()),
        override("paths.cache_dir", out.absolute() / "cache"),
        *extra,
    ]


def log_lines(path: Path) -> list[str]:
    """The last lines of a log, their Hydra prefix (time, module) left out, with the
    level kept as `LEVEL: ` for warnings and errors."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = []
    for raw in re.split(r"[\r\n]+", text):
        line = raw.strip()
        if match := LOG_PREFIX.match(line):
            level, line = match.group(1), line[match.end() :]
            if level in ("WARNING", "ERROR", "CRITICAL"):
                line = f"{level}: {line}"
        if line:
            lines.append(line)
    return lines


def error_line(lines: Sequence[str]) -> str:
    """Why a run failed: the last `error:` line (our errors, crack_lightning/cli.py) or
    logged ERROR, else the last line (a traceback's exception)."""
    for line in reversed(lines):
        if line.startswith(("error:", "ERROR:", "CRITICAL:")):
            return line
    return lines[-1] if lines else "it wrote nothing"


@dataclass
class AdaptRun:
    """An adaptation the page started: its run folder, process and log."""

    out: Path
    process: subprocess.Popen
    log: IO[bytes]
    started: float = field(default_factory=time.monotonic)

    @property
    def log_path(self) -> Path:
        return self.out / LOG_NAME

    @property
    def checkpoint(self) -> Path:
        return self.out / BEST_CHECKPOINT

    def finished(self) -> bool:
        """Whether the process has ended (its log closed then)."""
        if self.process.poll() is None:
            return False
        self.log.close()
        return True

    def succeeded(self) -> bool:
        return self.finished() and self.process.returncode == 0 and self.checkpoint.is_file()

    def describe(self) -> str:
        """One line for the page: the last progress line while it runs, the new
        checkpoint when it is done, the error line when it failed."""
        done = self.finished()  # before reading: a run that ended has written its last line
        lines = log_lines(self.log_path)
        if not done:
            took = duration(time.monotonic() - self.started)
            last = lines[-1] if lines else "starting"
            return f"Adapting ({took} so far; log {self.log_path}): {last}"
        if self.succeeded():
            return (
                f"Adapted: the new model is {self.checkpoint}. Load the adapted model "
                f"makes it the page's model."
            )
        return (
            f"Adapting failed (exit {self.process.returncode}): {error_line(lines)} "
            f"(log {self.log_path})"
        )

    def stop(self) -> None:
        """End the process (the page's process is ending)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


class Adapter:
    """The page's adaptations: one runs at a time, in its own folder under
    labels_dir/adapted/, started with the page's data_dir and adapt_settings."""

    def __init__(self, labels_dir: Path, data_dir: Path, settings: Sequence[str] = ()) -> None:
        self.root = Path(labels_dir) / ADAPTED_DIR
        self.data_dir = Path(data_dir)
        self.settings = list(settings)
        self.run: AdaptRun | None = None
        self._lock = threading.Lock()

    def running(self) -> AdaptRun | None:
        run = self.run
        return run if run is not None and not run.finished() else None

    def start(self, init_from: Path, site: Path, window: tuple[int, int]) -> AdaptRun:
        """Start `adapt_command` in a new run folder (named by the time), its output into
        the folder's adapt.log (the command itself: the run's .hydra/overrides.yaml); a
        run already going on is returned as it is."""
        with self._lock:
            if (running := self.running()) is not None:
                return running
            name = time.strftime("%Y-%m-%d_%H-%M-%S")
            out, count = self.root / name, 1
            while out.exists():  # a run that failed at once, started again
                out, count = self.root / f"{name}_{count}", count + 1
            out.mkdir(parents=True)
            command = adapt_command(init_from, site, window, out, self.data_dir, self.settings)
            log = (out / LOG_NAME).open("wb")
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
            self.run = AdaptRun(out, process, log)
            atexit.register(self.run.stop)
            return self.run
