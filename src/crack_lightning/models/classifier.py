"""LightningModule: a frozen torchvision backbone with a new dropout + linear head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from crack_lightning.data.transforms import to_unit_float
from crack_lightning.evaluation.metrics import EpochScores
from crack_lightning.evaluation.threshold import DEFAULT_THRESHOLD
from crack_lightning.models.backbones import build_feature_extractor, fold_batchnorm, normalization
from crack_lightning.models.optimizers import build_optimizer, build_scheduler
from crack_lightning.settings import CLASS_NAMES


class CrackNet(nn.Module):
    """The deployable network: RGB images in, logits (Negative, Positive) out.

    Scaling and the backbone's ImageNet normalisation are inside, so a checkpoint or an
    exported file needs nothing but resized uint8 images.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        mean: tuple,
        std: tuple,
        dropout: float,
        frozen: bool,
        channels_last: bool,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, len(CLASS_NAMES)))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # the frozen backbone with BatchNorm folded in (folded_backbone); a list, so that
        # it is neither a submodule nor in the state dict
        # (keyed by the stage it stops at, None for the whole backbone: stage_output)
        self._folded: dict[int | None, nn.Module] = {}
        self.register_load_state_dict_post_hook(_forget_folded)
        self.frozen = frozen
        # modules train() leaves in eval mode: the frozen backbone; fine-tuning
        # (finetuning.py) narrows this to the blocks that stay frozen
        self.keep_eval: list[nn.Module] = [self.backbone] if frozen else []
        if frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        # NHWC is what oneDNN's CPU and cuDNN's tensor-core convolutions run fastest on
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)
        # where the data module's 4-d inputs enter the backbone: None for images, k for the
        # cached output of the frozen stages backbone.features[:k] (fine-tuning the top
        # stages on cached activations, data/feature_cache.py); set by training, not saved
        self.input_stage: int | None = None

    @property
    def frozen(self) -> bool:
        """Whether the whole backbone is frozen (fine-tuning unfreezes part of it)."""
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen = value
        self._folded.clear()

    def _apply(self, fn: Any, recurse: bool = True) -> CrackNet:
        self._folded.clear()  # moved to another device or dtype: fold again on next use
        return super()._apply(fn, recurse)

    def folded_backbone(self, stage: int | None = None) -> nn.Module:
        """The frozen backbone (or its stages features[:stage]) with BatchNorm folded into
        its convolutions, built on first use and again after new weights, a device or
        dtype change, or (un)freezing."""
        if stage not in self._folded:
            part = self.backbone if stage is None else self.backbone.features[:stage]
            folded = fold_batchnorm(part).to(memory_format=self.memory_format)
            self._folded[stage] = folded.requires_grad_(False)
        return self._folded[stage]

    def train(self, mode: bool = True) -> CrackNet:
        """Keep frozen modules in eval mode, so their BatchNorm statistics never change."""
        super().train(mode)
        for module in self.keep_eval:
            module.eval()
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] (or float [0, 1]) RGB -> the backbone's normalised input."""
        return ((to_unit_float(images) - self.mean) / self.std).contiguous(
            memory_format=self.memory_format
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features; a frozen backbone runs BatchNorm-folded in inference
        mode (no graph, no saved activations), and only its small output is copied out
        for the head."""
        if not self.frozen:
            return self.backbone(self.normalize(images))
        # traced for export (TorchScript, ONNX) or compiled: the plain backbone, whose
        # BatchNorm the runtime or compiler folds itself
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        backbone = self.backbone if tracing else self.folded_backbone()
        with torch.inference_mode():
            features = backbone(self.normalize(images))
        return features.clone() if torch.is_grad_enabled() else features

    def stage_output(self, images: torch.Tensor, stage: int) -> torch.Tensor:
        """Output of the frozen stages backbone.features[:stage], BatchNorm folded, in
        inference mode: what the activation cache stores for fine-tuning the stages above."""
        with torch.inference_mode():
            return self.folded_backbone(stage)(self.normalize(images))

    def from_stage(self, hidden: torch.Tensor, stage: int) -> torch.Tensor:
        """Pooled features of stage outputs: the backbone's own forward (pooling and all)
        with its first `stage` stages left out."""
        features = self.backbone.features
        self.backbone.features = features[stage:]  # a slice shares the modules
        try:
            return self.backbone(hidden.contiguous(memory_format=self.memory_format))
        finally:
            self.backbone.features = features

    def pooled(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features of what the data module serves: cached pooled features (N, dim)
        pass, cached stage outputs run the rest of the backbone, images all of it."""
        if inputs.ndim == 2:
            return inputs
        if self.input_stage is not None:
            return self.from_stage(inputs, self.input_stage)
        return self.features(inputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _forget_folded(net: CrackNet, incompatible_keys: Any) -> None:
    """load_state_dict hook: new weights, so the folded copy is stale."""
    net._folded.clear()


class CrackClassifier(L.LightningModule):
    """Classifies uint8 RGB image batches as Negative (0) or Positive (1, crack)."""

    def __init__(
        self,
        backbone: str,
        pretrained: bool,
        weights_path: str | None,
        freeze_backbone: bool,
        channels_last: bool,
        dropout: float,
        lr: float,
        weight_decay: float,
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
        extractor, feature_dim = build_feature_extractor(backbone, pretrained, weights_path, name)
        mean, std = normalization(backbone, extractor)
        self.net = CrackNet(
            extractor,
            feature_dim,
            mean,
            std,
            dropout,
            frozen=freeze_backbone,
            channels_last=channels_last,
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

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> dict:
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
