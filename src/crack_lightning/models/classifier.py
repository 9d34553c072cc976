"""LightningModule: training of the deployable network (models/network.py), a frozen
backbone with a new dropout + linear head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from crack_lightning.errors import ModelConfigError
from crack_lightning.evaluation.metrics import binary_scores, defined
from crack_lightning.evaluation.threshold import DEFAULT_THRESHOLD
from crack_lightning.models.network import Activations, build_network
from crack_lightning.models.optimizers import build_optimizer, build_scheduler
from crack_lightning.settings import Rule, above


class EpochScores(Metric):
    """An epoch's P(crack) and labels, gathered across DDP processes by torchmetrics;
    compute() gives binary_scores of them at `threshold`."""

    full_state_update = False

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        self.probs.append(probs.detach().float())
        self.labels.append(labels.detach())

    def compute(self) -> dict[str, float]:
        if isinstance(self.probs, list) and not self.probs:  # an epoch without batches
            return {}
        probs = dim_zero_cat(self.probs).cpu().numpy()
        labels = dim_zero_cat(self.labels).cpu().numpy()
        return defined(binary_scores(labels, probs, self.threshold))


class CrackClassifier(L.LightningModule):
    """Classifies uint8 RGB image batches as Negative (0) or Positive (1, crack)."""

    settings_error = ModelConfigError
    # what it learns from (data.targets)
    targets = "labels"

    @staticmethod
    def check_together(settings: dict[str, Any], section: str) -> None:
        """model=timm: a model name timm knows, at an image size it takes."""
        if settings["backbone"] == "timm":
            from crack_lightning.models.timm_backbones import check_timm_name

            check_timm_name(settings.get("name") or "", settings["image_size"])

    def __init__(
        self,
        backbone: str,
        pretrained: bool,
        weights_path: str | None,
        freeze_backbone: bool,
        channels_last: bool,
        dropout: Annotated[float, Rule("in [0, 1)", lambda p: 0 <= p < 1)],
        lr: Annotated[float, above(0, "a learning rate")],
        weight_decay: Annotated[float, Rule(">= 0", lambda v: v >= 0)],
        scheduler: Mapping | None,
        image_size: int,
        # `_target_` + `_partial_` configs (models/optimizers.py); optimizer is None only in
        # checkpoints saved before it was configurable (they predict, but do not train)
        optimizer: Mapping | None = None,
        # the timm model when backbone is "timm" (conf/model/timm.yaml)
        name: str | None = None,
    ) -> None:
        super().__init__()
        # plain values only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(logger=False)
        self.net = build_network(
            backbone,
            pretrained,
            weights_path,
            freeze_backbone,
            channels_last,
            dropout,
            image_size,
            name,
        )
        # each stage's pooled metrics (evaluation/metrics.py) at the untuned threshold
        self.train_metrics = EpochScores(DEFAULT_THRESHOLD)
        self.val_metrics = EpochScores(DEFAULT_THRESHOLD)
        self.test_metrics = EpochScores(DEFAULT_THRESHOLD)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable}

    def _step(self, batch: tuple[torch.Tensor | Activations, torch.Tensor], stage: str) -> dict:
        """Images or cached activations (data/feature_cache.py), whichever the batch holds."""
        inputs, labels = batch
        logits = self.net.head(self.net.pooled(inputs))
        loss = F.cross_entropy(logits, labels)
        probs = logits.softmax(dim=-1)[:, 1]
        getattr(self, f"{stage}_metrics").update(probs, labels)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=len(labels),
            sync_dist=True,  # under DDP: averaged over the processes (a no-op otherwise)
        )
        return {"loss": loss, "probs": probs.detach()}

    def _log_epoch_metrics(self, stage: str) -> None:
        """Log the epoch's metrics once, at its end, from all of its predictions (gathered
        from every process under DDP): logging them every step would cost Lightning a
        walk over the stored predictions per call, quadratic in the epoch's length.
        Figures undefined for the epoch (ROC-AUC with one class) are not logged."""
        metrics = getattr(self, f"{stage}_metrics")
        if not self.trainer.sanity_checking:  # a couple of batches, often of one class
            scores = metrics.compute()
            self.log_dict({f"{stage}/{k}": v for k, v in scores.items()}, prog_bar=stage == "val")
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def training_step(self, batch: Any, batch_idx: int) -> dict:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> dict:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict:
        return self._step(batch, "test")

    def configure_optimizers(self) -> dict:
        """model.optimizer over the trainable parameters, and model.scheduler if set."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.hparams.optimizer or {}, params)
        scheduler = build_scheduler(self.hparams.scheduler, optimizer)
        return {"optimizer": optimizer} | ({"lr_scheduler": scheduler} if scheduler else {})
