"""LightningModule: training of the deployable network (models/network.py), a frozen
backbone with a new dropout + linear head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from crack_lightning.errors import ModelConfigError
from crack_lightning.evaluation.threshold import DEFAULT_THRESHOLD
from crack_lightning.models.network import Activations, build_network
from crack_lightning.models.training_module import (
    LEARNING_RATE,
    WEIGHT_DECAY,
    EpochScores,
    TrainingModule,
)
from crack_lightning.settings import Rule


class CrackClassifier(TrainingModule):
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
        lr: Annotated[float, LEARNING_RATE],
        weight_decay: Annotated[float, WEIGHT_DECAY],
        scheduler: Mapping | None,
        image_size: int,
        # `_target_` + `_partial_` configs (models/training_module.py); optimizer is None only in
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

    def _step(self, batch: tuple[torch.Tensor | Activations, torch.Tensor], stage: str) -> dict:
        """Images or cached activations (data/feature_cache.py), whichever the batch holds."""
        inputs, labels = batch
        logits = self.net.head(self.net.pooled(inputs))
        loss = F.cross_entropy(logits, labels)
        probs = logits.softmax(dim=-1)[:, 1]
        getattr(self, f"{stage}_metrics").update(probs, labels)
        self.log_loss(stage, loss, len(labels))
        return {"loss": loss, "probs": probs.detach()}

    def epoch_metrics(self, stage: str) -> list[Metric]:
        return [getattr(self, f"{stage}_metrics")]
