"""`crack-data download|check [key=value ...]`: get and inspect the data set.

Settings and their defaults: conf/data_tool.yaml (`crack-data --help`); the data root
defaults to conf/data's `data.root`. `check` checks `root=` or, when the data config sets
data.sources (`+data/sources@data.sources.NAME=sdnet2018 data.sources.NAME.root=DIR`),
every source, whatever its layout. Exit codes: 0 fine, 1 `check` found problems that
would corrupt training, 2 a setting or the data set is wrong as the message explains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from omegaconf import DictConfig

from crack_lightning.cli import run_tool
from crack_lightning.data.check import check_sources
from crack_lightning.data.fetch import ensure_source, root_spec
from crack_lightning.data.sources import (
    UNPACK_IMAGE_LIMIT,
    UNPACK_LIMIT,
    UNPACK_RATIO_LIMIT,
    data_sources,
)
from crack_lightning.errors import DataError
from crack_lightning.settings import settings_of

ACTIONS = ("download", "check")


@dataclass(frozen=True)
class DataToolSettings:
    """`crack-data` (conf/data_tool.yaml)."""

    settings_error = DataError
    action: str
    root: str
    archive: str | None
    keep_archive: bool
    quick: bool
    unpack_limit_gib: Annotated[float, UNPACK_LIMIT]
    unpack_ratio_limit: Annotated[float, UNPACK_RATIO_LIMIT]
    unpack_image_limit_mib: Annotated[float, UNPACK_IMAGE_LIMIT]


def run(cfg: DictConfig) -> int:
    settings = settings_of(cfg, DataToolSettings, "", others=("paths", "data", "task_name"))
    if settings.action == "download":
        ensure_source(
            root_spec(settings.root),
            archive=settings.archive,
            keep_archive=settings.keep_archive,
            unpack_limit_gib=settings.unpack_limit_gib,
            unpack_ratio_limit=settings.unpack_ratio_limit,
            unpack_image_limit_mib=settings.unpack_image_limit_mib,
        )
        return 0
    if settings.action != "check":
        raise DataError(f"action={settings.action} must be one of {', '.join(ACTIONS)}.")
    data = cfg.get("data") or {}
    specs = data_sources(settings.root, data.get("sources"), "random", 0)
    reports = check_sources(specs, full=not settings.quick)
    print("\n".join(report.summary() for report in reports))
    return 0 if all(report.ok for report in reports) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool("data_tool", run, argv, actions=ACTIONS)


if __name__ == "__main__":
    raise SystemExit(main())
