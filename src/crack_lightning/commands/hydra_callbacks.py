"""Checks Hydra runs before it makes a run or sweep folder and writes its .hydra/ files
and log there (declared under hydra.callbacks: conf/hydra/default.yaml, conf/train.yaml).

Hydra turns an error raised in a callback into a warning and goes on, so each check takes
the one-line exit of cli.user_errors itself (a SystemExit passes through Hydra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from crack_lightning.cli import user_errors
from crack_lightning.io import check_writable
from crack_lightning.training.run_lock import (
    first_process,
    refuse_replacing,
    refuse_replacing_jobs,
)


class OutputFolders(Callback):
    """train.py and predict.py: the folder Hydra is about to make for a run or a sweep (and
    paths.log_dir above it) checked by io.check_writable, so that a file in the way or a
    read-only disk is one `error:` line naming the setting."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = config.hydra.run.dir
        setting = "paths.output_dir" if run_dir == config.paths.output_dir else "hydra.run.dir"
        check_output_folder(config, Path(run_dir), setting)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_output_folder(config, Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def check_output_folder(config: DictConfig, folder: Path, setting: str) -> None:
    """paths.log_dir when the folder lies under it, then the folder; nothing is made."""
    with user_errors():
        log_dir = Path(config.paths.log_dir)
        if folder.is_relative_to(log_dir):
            check_writable(log_dir, "paths.log_dir", folder=True, make=False)
        check_writable(folder, setting, folder=True, make=False)


class KeepRuns(Callback):
    """train.py: a run directory, or a sweep's job folders, holding runs refused unless the
    command continues them or says to replace them (training/run_lock.py)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if first_process():  # DDP's other processes find the first one's files there
            with user_errors():
                run_dir = Path(config.paths.output_dir)
                refuse_replacing(run_dir, config.get("ckpt_path"), bool(config.overwrite))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with user_errors():
            sweep_dir = Path(config.hydra.sweep.dir)
            refuse_replacing_jobs(sweep_dir, config.get("ckpt_path"), bool(config.overwrite))
