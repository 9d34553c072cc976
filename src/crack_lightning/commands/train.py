"""`crack-train` / `python train.py`: complete the command line, take the run directory's
lock, and run training.run.train as a Hydra application."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from crack_lightning.cli import conf_dir, hydra_app, prepare_process, user_errors
from crack_lightning.training.distributed import launch_argv
from crack_lightning.training.resume import resume_argv
from crack_lightning.training.run_lock import refuse_busy_run_dir, run_dir_lock

log = logging.getLogger(__name__)


def train() -> Any:
    """Complete the command line (resume, torchrun), refuse a run directory another live
    run holds, then run the Hydra application."""
    prepare_process()
    with user_errors():
        sys.argv = resume_argv(launch_argv(sys.argv), conf_dir())
        refuse_busy_run_dir(sys.argv)  # before Hydra writes into another live run's folder
    return hydra_app("train", train_task)()


def train_task(cfg: DictConfig) -> float | None:
    """One training job in its run directory, under its lock; returns optimized_metric
    for Hydra's sweepers."""
    from crack_lightning.training.run import train as train_model  # not for --help

    if HydraConfig.initialized():  # in a multirun each job has its own directory
        with open_dict(cfg):
            cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    with run_dir_lock(Path(cfg.paths.output_dir)):
        metrics = train_model(cfg)
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        log.warning("optimized_metric=%s is not among the metrics %s", name, sorted(metrics))
    return metrics.get(name) if name else None


if __name__ == "__main__":  # python -m crack_lightning.commands.train (the page's adaptation)
    train()
