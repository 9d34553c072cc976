"""Callback: per-source validation/test metrics, and the decision threshold it stores.

Validation and test loaders are not shuffled, so the n-th prediction of an epoch is the
n-th sample of the split; the data module says which source each one came from. (Under
DDP each process sees a share of the split: this callback then scores process 0's
share only, and says so once.)
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch

from crack_lightning.evaluation.per_source import (
    choose_threshold,
    per_source_scores,
)
from crack_lightning.inference.threshold import METADATA_KEY as CHECKPOINT_KEY

log = logging.getLogger(__name__)


class SourceMetrics(L.Callback):
    """Logs `STAGE/SOURCE/METRIC`, `STAGE/mean_source/METRIC`, `STAGE/bal_acc` and, with
    a threshold rule, `val/threshold`, the validation-chosen threshold that checkpoints
    carry (checkpoint["decision_threshold"]) for predict, scan and export. The settings
    are checked at start-up (settings.SourceMetricsSettings)."""

    def __init__(
        self, threshold_rule: str | None, target_recall: float, threshold_tolerance: float
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
        sources = np.asarray(sources[: len(probs)])  # limit_*_batches: the first batches
        if trainer.world_size > 1:
            log.warning("Per-source metrics under DDP score process 0's share of %s", split)
        stage = "val" if split == "val" else "test"
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
            pl_module.log("val/mean_source/bal_acc_at_threshold", tuned["mean_source/bal_acc"])
        scores = per_source_scores(labels, probs, sources, names, 0.5)
        pl_module.log_dict({f"{stage}/{k}": v for k, v in scores.items()})
        if stage == "test" and self.threshold is not None:  # what predict.py will decide
            tuned = per_source_scores(labels, probs, sources, names, self.threshold)
            pl_module.log_dict({f"test_at_threshold/{k}": v for k, v in tuned.items()})

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
