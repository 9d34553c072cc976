"""What the loggers (conf/logger/) get beyond params and metrics: figures and files.

TensorBoard gets figures as images (callbacks.ValidationFigures); MLflow gets them, and at
the end of the run the best checkpoint and the run's records, as artifacts: what `mlflow
ui` lists beside a run's params and metrics. CSV and W&B get the config and the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def mlflow_loggers(trainer: L.Trainer) -> list[MLFlowLogger]:
    """The trainer's MLflow loggers, on the process that writes (rank 0)."""
    if not trainer.is_global_zero:
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]


def log_figures(trainer: L.Trainer, figures: Mapping[str, Figure], epoch: int) -> None:
    """A validation epoch's figures as MLflow artifacts: figures/epoch_003/val_<name>.png."""
    for logger in mlflow_loggers(trainer):
        for tag, figure in figures.items():
            name = f"figures/epoch_{epoch:03d}/{tag.replace('/', '_')}.png"
            logger.experiment.log_figure(logger.run_id, figure, name)


def log_run_files(trainer: L.Trainer, files: Sequence[tuple[Path | None, str]]) -> None:
    """The run's files (the best checkpoint, metrics.json, ...) as MLflow artifacts, each
    into its folder (checkpoints/, run/); those that do not exist are left out."""
    for logger in mlflow_loggers(trainer):
        for path, folder in files:
            if path is not None and path.is_file():
                logger.experiment.log_artifact(logger.run_id, str(path), folder)
        run = logger.experiment.get_run(logger.run_id)
        log.info("MLflow run %s: artifacts in %s", run.info.run_name, run.info.artifact_uri)
