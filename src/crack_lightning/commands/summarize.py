"""`crack-summarize sweep_dir=SWEEP_DIR [metric=val/loss direction=minimize]`: rank a
sweep's jobs (settings: conf/summarize.yaml; the table: training/sweep_summary.py)."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from crack_lightning.cli import run_tool
from crack_lightning.settings import SummarizeSettings, validate
from crack_lightning.training.sweep_summary import write_summary


def summarize(cfg: DictConfig) -> None:
    """Write the sweep's summary files and print the table."""
    settings = validate(cfg, SummarizeSettings, "")
    direction = settings.direction.value if settings.direction else None
    print(write_summary(settings.sweep_dir, settings.metric, direction), end="")


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: settings from conf/summarize.yaml."""
    return run_tool("summarize", summarize, argv)


if __name__ == "__main__":
    raise SystemExit(main())
