"""Callback: per-source validation/test metrics of a run on several data sources, and
the decision threshold it stores.

Validation and test loaders are not shuffled, so the n-th prediction of an epoch is the
sample its loader's sampler gave n-th; the data module says which source each one came
from. (Under DDP each process sees a share of the split: this callback then scores
process 0's share only, and says so once.)
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import lightning as L
import numpy as np
import torch

from crack_lightning.errors import ModelConfigError
from crack_lightning.evaluation.metrics import MEAN, per_source_scores
from crack_lightning.evaluation.threshold import (
    DEFAULT_THRESHOLD,
    ThresholdRule,
    choose_threshold,
)
from crack_lightning.evaluation.threshold import METADATA_KEY as CHECKPOINT_KEY
from crack_lightning.settings import Rule

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
