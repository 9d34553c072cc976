"""Callback: the validation images the model is surest it is right about, and is not.

After each validation epoch, a grid per source of the `worst_per_source` validation
images decided most confidently against their label, titled with label and P(crack),
goes to TensorBoard (`val/worst/SOURCE`, Images tab) and MLflow. At the end of fitting,
the suspect labels of the validation split (evaluation/suspects.py: cleanlab's
confident learning) are written to the run directory as suspect_labels.csv and .png.

Suspects come from the best checkpoint's epoch (the model the run keeps, the one
predict.py will use), once at the end of fit, not every epoch: an early epoch's model
disputes many right labels, and the list is meant to be read by a person. Validation
images were never trained on, so their P(crack) is out-of-sample, as confident learning
needs.

The pictures come from the files (data/decode.py), by the validation loader's order, so
it works the same when batches hold cached features instead of images, and only the few
shown are decoded. Under DDP each process sees a share of the split: process 0's share
is shown (its indices come from its sampler).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from crack_lightning.evaluation.suspects import (
    grouped_suspects,
    mistake_grid,
    suspect_rows,
    worst_mistakes,
    write_suspects,
)
from crack_lightning.settings import CLASS_NAMES, NONE_IS_OFF, OPEN_UNIT
from crack_lightning.training.loggers import log_figures, mlflow_loggers
from crack_lightning.training.source_metrics import loader_positions

log = logging.getLogger(__name__)


class ValidationMistakes(L.Callback):
    """The settings are checked at start-up (settings.ValidationMistakesSettings)."""

    def __init__(
        self,
        worst_per_source: Annotated[int, NONE_IS_OFF],
        suspect_labels: bool,
        suspects_shown: Annotated[int, NONE_IS_OFF],
        threshold: Annotated[float, OPEN_UNIT],
        output_dir: str,
    ) -> None:
        self.worst_per_source = worst_per_source
        self.suspect_labels = suspect_labels
        self.suspects_shown = suspects_shown
        self.threshold = threshold
        self.output_dir = Path(output_dir)
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        # per validated epoch: (P(crack), the checkpoint's monitored value or None)
        self.epochs: dict[int, tuple[np.ndarray, float | None]] = {}
        self.labels = np.zeros(0, dtype=int)
        self.positions = np.zeros(0, dtype=int)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._probs, self._labels = [], []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._probs.append(outputs["probs"].float().cpu())
        self._labels.append(batch[1].cpu())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the epoch's metrics are logged (and before checkpoints are saved)."""
        datamodule = trainer.datamodule
        if (
            trainer.sanity_checking
            or trainer.state.fn != "fit"  # not the evaluation of the best checkpoint
            or not trainer.is_global_zero
            or not self._probs
            or not hasattr(datamodule, "split_samples")
        ):
            return
        probs = torch.cat(self._probs).numpy()
        self.labels = torch.cat(self._labels).numpy().astype(int)
        self.positions = loader_positions(trainer, "val", len(probs))
        monitor = getattr(trainer.checkpoint_callback, "monitor", None)
        value = trainer.callback_metrics.get(monitor) if monitor else None
        self.epochs[trainer.current_epoch] = (probs, None if value is None else float(value))
        if self.worst_per_source > 0:
            self.log_worst(trainer, probs)

    def sources(self, trainer: L.Trainer) -> tuple[list[str], np.ndarray, list[str]]:
        """(source names, each scored image's source index, each one's sample string)."""
        datamodule = trainer.datamodule
        names, sources = datamodule.split_sources("val")
        samples = datamodule.split_samples("val")
        source = np.asarray(sources, dtype=int)[self.positions]
        return names or ["val"], source, [samples[i][0] for i in self.positions]

    def log_worst(self, trainer: L.Trainer, probs: np.ndarray) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not (loggers or mlflow_loggers(trainer)):
            return  # nobody to show them to: nothing decoded or drawn
        names, source, paths = self.sources(trainer)
        figures = {}
        for number, name in enumerate(names):
            members = np.flatnonzero(source == number)
            worst = members[
                worst_mistakes(
                    self.labels[members], probs[members], self.threshold, self.worst_per_source
                )
            ]
            rows = [
                {
                    "path": paths[i],
                    "given_label": CLASS_NAMES[self.labels[i]],
                    "prob_crack": float(probs[i]),
                }
                for i in worst
            ]
            grid = mistake_grid(rows, columns=min(8, max(1, len(rows))))
            if grid is not None:
                figures[f"val/worst/{name}" if len(names) > 1 else "val/worst"] = grid
        for tag, figure in figures.items():
            for logger in loggers:
                logger.experiment.add_figure(tag, figure, trainer.global_step, close=False)
        log_figures(trainer, figures, trainer.current_epoch)

    def chosen_epoch(self, trainer: L.Trainer) -> int | None:
        """The epoch of the best checkpoint (matched by its monitored value), else the last."""
        if not self.epochs:
            return None
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_score", None)
        if best is not None and getattr(callback, "monitor", None):
            matching = [
                epoch
                for epoch, (_, value) in self.epochs.items()
                if value is not None and math.isclose(value, float(best), rel_tol=1e-6)
            ]
            if matching:
                return max(matching)
            log.info("The best checkpoint is from an earlier session: suspects of the last epoch.")
        return max(self.epochs)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = self.chosen_epoch(trainer)
        if not self.suspect_labels or epoch is None or not trainer.is_global_zero:
            return
        probs = self.epochs[epoch][0]
        names, source, paths = self.sources(trainer)
        indices, quality = grouped_suspects(self.labels, probs, source)
        rows = suspect_rows(indices, paths, self.labels, probs, quality, [names[s] for s in source])
        written = write_suspects(self.output_dir, rows, self.suspects_shown)
        log.info(
            "%d suspect label(s) among %d validation images%s (epoch %d's model): %s",
            len(rows),
            len(probs),
            " (process 0's share)" if trainer.world_size > 1 else "",
            epoch,
            ", ".join(map(str, written)),
        )
