"""`crack-data download|check [key=value ...]`: get and inspect the data set.

Settings and their defaults: conf/data_tool.yaml (`crack-data --help`); the data root
defaults to conf/data's `data.root`. Exit codes: 0 fine, 1 `check` found problems that
would corrupt training, 2 a setting or the data set is wrong as the message explains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from omegaconf import MISSING, DictConfig

from crack_lightning.cli import run_tool
from crack_lightning.data.check import check_dataset
from crack_lightning.data.download import ensure_dataset
from crack_lightning.errors import DataError
from crack_lightning.settings import validate

ACTIONS = ("download", "check")


@dataclass
class DataToolSettings:
    error = DataError
    action: str = MISSING
    root: str = MISSING
    archive: str | None = MISSING
    keep_archive: bool = MISSING
    quick: bool = MISSING


def run(cfg: DictConfig) -> int:
    settings = validate(cfg, DataToolSettings, "")
    if settings.action == "download":
        ensure_dataset(settings.root, archive=settings.archive, keep_archive=settings.keep_archive)
        return 0
    if settings.action != "check":
        raise DataError(f"action={settings.action} must be one of {', '.join(ACTIONS)}.")
    report = check_dataset(settings.root, full=not settings.quick)
    print(report.summary())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool("data_tool", run, argv, actions=ACTIONS)
