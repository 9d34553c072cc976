"""`crack-summarize sweep_dir=SWEEP_DIR [metric=val/loss direction=minimize]`: rank a
sweep's jobs (settings: conf/summarize.yaml; the table: training/sweep_summary.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from omegaconf import DictConfig

from crack_lightning.cli import run_tool
from crack_lightning.errors import RunDirError
from crack_lightning.settings import settings_of
from crack_lightning.training.sweep_summary import write_summary


@dataclass(frozen=True)
class SummarizeSettings:
    """conf/summarize.yaml."""

    settings_error = RunDirError
    sweep_dir: str
    metric: str | None  # null: the jobs' optimized_metric
    direction: Literal["maximize", "minimize"] | None  # null: the jobs' optimized_direction


def summarize(cfg: DictConfig) -> None:
    """Write the sweep's summary files and print the table."""
    settings = settings_of(cfg, SummarizeSettings, "", others=("task_name",))
    print(write_summary(settings.sweep_dir, settings.metric, settings.direction), end="")


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: settings from conf/summarize.yaml."""
    return run_tool("summarize", summarize, argv)


if __name__ == "__main__":
    raise SystemExit(main())
