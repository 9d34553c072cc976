"""What each validation epoch reports beyond the loss, and how it reaches the loggers.

- SourceMetrics: per-source validation/test metrics of a run on several data sources, and
  the decision threshold it stores in checkpoints.
- ValidationFigures: the confusion matrix, to TensorBoard (Images tab) and MLflow.
- ValidationMistakes: after each validation epoch, a grid per source of the
  `worst_per_source` validation images decided most confidently against their label,
  titled with label and P(crack) (TensorBoard `val/worst/SOURCE`, MLflow); at the end of
  fitting, the suspect labels of the validation split (evaluation/suspects.py: cleanlab's
  confident learning) as suspect_labels.csv and .png in the run directory.
- MLflow gets these figures as artifacts (training/callbacks.py log_figures; the best
  checkpoint and the run's records follow at the end of the run, log_run_files). CSV and
  W&B get the config and the metrics.

Validation and test loaders are not shuffled, so the n-th prediction of an epoch is the
sample its loader's sampler gave n-th; the data module says which source each one came
from, and the mistakes' pictures come from the files (data/decode.py) by that order, so
they work the same when batches hold cached features, and only the few shown are decoded.
Under DDP each process sees a share of the split: the per-source figures and pictures are
process 0's share, said once.

Suspects come from the best checkpoint's epoch (the model the run keeps, the one
predict.py will use), once at the end of fit, not every epoch: an early epoch's model
disputes many right labels, and the list is meant to be read by a person. Validation
images were never trained on, so their P(crack) is out-of-sample, as confident learning
needs.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from crack_lightning.errors import ModelConfigError
from crack_lightning.evaluation.metrics import MEAN, confusion_matrix, per_source_scores
from crack_lightning.evaluation.suspects import (
    grouped_suspects,
    mistake_grid,
    suspect_rows,
    worst_mistakes,
    write_suspects,
)
from crack_lightning.evaluation.threshold import (
    DEFAULT_THRESHOLD,
    ThresholdRule,
    choose_threshold,
)
from crack_lightning.evaluation.threshold import METADATA_KEY as CHECKPOINT_KEY
from crack_lightning.settings import CLASS_NAMES, NONE_IS_OFF, OPEN_UNIT, Rule, at_least
from crack_lightning.training.callbacks import log_figures, mlflow_loggers

log = logging.getLogger(__name__)


class SourceMetrics(L.Callback):
    """With several sources: logs `STAGE/SOURCE/METRIC` and `STAGE/mean_source/METRIC`
    (the pooled `STAGE/METRIC` come from the model, CrackClassifier). With a threshold
    rule: `val/threshold`, the validation-chosen threshold that checkpoints carry
    (checkpoint["decision_threshold"]) for predict, scan and export, the balanced
    accuracy at it, and the test metrics at it (`test_at_threshold/...`)."""

    settings_error = ModelConfigError

    def __init__(
        self,
        threshold_rule: ThresholdRule | None,
        target_recall: Annotated[float, Rule("in (0, 1]", lambda v: 0 < v <= 1)],
        threshold_tolerance: Annotated[
            float,
            Rule(
                "in [0, 1): how much balanced accuracy a threshold nearer 0.5 may give up",
                lambda v: 0 <= v < 1,
            ),
        ],
    ) -> None:
        self.threshold_rule = threshold_rule
        self.target_recall = target_recall
        self.threshold_tolerance = threshold_tolerance
        self.threshold: float | None = None
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def _start(self) -> None:
        self._probs, self._labels = [], []

    def _collect(self, outputs: Any, batch: Any) -> None:
        self._probs.append(outputs["probs"].float().cpu())
        self._labels.append(batch[1].cpu())

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        if trainer.sanity_checking or not self._probs:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "split_sources"):
            return
        probs = torch.cat(self._probs).numpy()
        labels = torch.cat(self._labels).numpy()
        names, sources = datamodule.split_sources(split)
        sources = np.asarray(sources)[loader_positions(trainer, split, len(probs))]
        stage = "val" if split == "val" else "test"
        several = len(names) > 1
        if trainer.world_size > 1 and (several or self.threshold_rule is not None):
            log.warning("Per-source metrics under DDP score process 0's share of %s", split)
        if split == "val" and self.threshold_rule is not None:
            self.threshold = choose_threshold(
                labels,
                probs,
                sources,
                self.threshold_rule,
                self.target_recall,
                self.threshold_tolerance,
            )
            pl_module.log("val/threshold", self.threshold)
            tuned = per_source_scores(labels, probs, sources, names, self.threshold)
            name = f"{MEAN}/bal_acc" if several else "bal_acc"
            pl_module.log(f"val/{name}_at_threshold", tuned[name])
        if several:  # the pooled figures are the model's own
            scores = per_source_scores(labels, probs, sources, names, DEFAULT_THRESHOLD)
            pl_module.log_dict({f"{stage}/{k}": v for k, v in scores.items() if "/" in k})
        if stage == "test" and self.threshold is not None:  # what predict.py will decide
            tuned = per_source_scores(labels, probs, sources, names, self.threshold)
            pl_module.log_dict({f"test_at_threshold/{k}": v for k, v in tuned.items()})

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse to monitor a mean over sources in a run on one source (it has none:
        its figures are the plain STAGE/METRIC ones)."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "split_sources"):
            return
        if len(datamodule.split_sources("val")[0]) > 1:
            return
        for callback in [*trainer.checkpoint_callbacks, *trainer.early_stopping_callbacks]:
            monitor = getattr(callback, "monitor", None) or ""
            if f"/{MEAN}/" in monitor:
                raise ModelConfigError(
                    f"{type(callback).__name__} monitors {monitor}, but this run has one data "
                    f"source, so no mean over sources: monitor "
                    f"{monitor.replace(f'/{MEAN}/', '/')} (the same figure) instead."
                )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self._collect(outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._collect(outputs, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    def restore_threshold(self, checkpoint: dict) -> None:
        """Take the threshold a checkpoint was saved with, so that test metrics of the best
        checkpoint use its own threshold, not the last epoch's."""
        stored = checkpoint.get(CHECKPOINT_KEY)
        if stored is not None:
            self.threshold = float(stored["threshold"])

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict
    ) -> None:
        if self.threshold is not None:
            checkpoint[CHECKPOINT_KEY] = {
                "threshold": self.threshold,
                "rule": self.threshold_rule,
                "target_recall": self.target_recall,
                "tolerance": self.threshold_tolerance,
            }


def loader_positions(trainer: L.Trainer, split: str, count: int) -> np.ndarray:
    """The split positions of the first `count` predictions of split `split` ("val" or
    "test"): its loader's order, as its sampler gives it (under DDP each process's
    share; with limit_*_batches the first batches)."""
    loader = trainer.val_dataloaders if split == "val" else trainer.test_dataloaders
    loader = loader[0] if isinstance(loader, list | tuple) else loader
    sampler: Any = getattr(loader, "sampler", None)
    order = list(iter(sampler)) if sampler is not None else range(count)
    return np.asarray(order[:count], dtype=int)


class ValidationFigures(L.Callback):
    """After each validation epoch, log the confusion matrix to TensorBoard (Images tab) and
    MLflow (artifacts, figures/). The worst images per source are ValidationMistakes'."""

    def __init__(
        self, threshold: Annotated[float, OPEN_UNIT], every_n_epochs: Annotated[int, at_least(1)]
    ) -> None:
        self.threshold = threshold
        self.every_n_epochs = every_n_epochs
        self.matrix = np.zeros((2, 2), dtype=np.int64)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.matrix[:] = 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        probs = outputs["probs"].float().cpu().numpy()
        self.matrix += confusion_matrix(batch[1].cpu().numpy(), probs >= self.threshold)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1 and not trainer.sanity_checking:
            # under DDP each process saw its share of the images: add the matrices up
            total = trainer.strategy.reduce(torch.as_tensor(self.matrix), reduce_op="sum")
            self.matrix = total.cpu().numpy().astype(np.int64)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        artifacts = mlflow_loggers(trainer)  # MLflow keeps them as files
        epoch = trainer.current_epoch
        skipped = trainer.sanity_checking or epoch % self.every_n_epochs
        if skipped or not (loggers or artifacts) or not trainer.is_global_zero:
            return
        from crack_lightning.evaluation.plots import confusion_matrix_figure  # matplotlib

        figure = confusion_matrix_figure(self.matrix, title=f"Validation, epoch {epoch}")
        for logger in loggers:
            logger.experiment.add_figure(
                "val/confusion_matrix", figure, trainer.global_step, close=False
            )
        log_figures(trainer, {"val/confusion_matrix": figure}, epoch)


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
