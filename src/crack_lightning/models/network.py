"""The deployable network, in plain torch: uint8 RGB images in, logits (Negative,
Positive) out. Training wraps it in a LightningModule (models/classifier.py); prediction,
scanning and export build it from a checkpoint without Lightning (inference/).

Training may serve it cached backbone outputs instead of images (data/feature_cache.py);
such a batch is an `Activations`, which says what it holds, and `CrackNet.pooled` runs
the part of the backbone that each kind of batch still needs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ConvNeXt

from crack_lightning.data.transforms import to_unit_float
from crack_lightning.models.backbones import build_feature_extractor, fold_batchnorm, normalization
from crack_lightning.settings import CLASS_NAMES


@dataclass
class Activations:
    """A batch of backbone outputs served in place of images: pooled features (N, dim)
    when `stage` is None, else the output (N, C, H, W) of the frozen stages
    backbone.features[:stage], which the stages from `stage` on finish."""

    values: torch.Tensor
    stage: int | None = None

    def to(self, *args: Any, **kwargs: Any) -> Activations:
        """Moved like a tensor (Lightning moves batches with `.to`)."""
        return replace(self, values=self.values.to(*args, **kwargs))


class CrackNet(nn.Module):
    """The deployable network: RGB images in, logits (Negative, Positive) out.

    Scaling and the backbone's ImageNet normalisation are inside, so a checkpoint or an
    exported file needs nothing but resized uint8 images. `hparams` holds the settings it
    was built from (build_network), which an export records.
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
        hparams: SimpleNamespace | None = None,
    ) -> None:
        super().__init__()
        self.hparams = hparams or SimpleNamespace()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, len(CLASS_NAMES)))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # the frozen backbone (or its stages features[:stage]) with BatchNorm folded in,
        # keyed by the stage it stops at (None: the whole backbone); a plain dict, so
        # that they are neither submodules nor in the state dict
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
        """Pooled features of the output of backbone.features[:stage]: the stages from
        `stage` on, then what the backbone runs after its stages (after_stages)."""
        hidden = hidden.contiguous(memory_format=self.memory_format)
        return after_stages(self.backbone, self.backbone.features[stage:](hidden))

    def pooled(self, inputs: torch.Tensor | Activations) -> torch.Tensor:
        """Pooled features of what a batch holds: images run the whole backbone, a
        stage's cached activations the stages above it, cached pooled features nothing."""
        if not isinstance(inputs, Activations):
            return self.features(inputs)
        if inputs.stage is None:
            return inputs.values
        return self.from_stage(inputs.values, inputs.stage)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _forget_folded(net: CrackNet, incompatible_keys: Any) -> None:
    """load_state_dict hook: new weights, so the folded copy is stale."""
    net._folded.clear()


def after_stages(backbone: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What a backbone built as `features` stages computes after them, as its own forward
    does: a timm model cut into stages runs the rest of its model (models/timm_backbones.py);
    torchvision's MobileNets and EfficientNet pool, flatten and apply their classifier
    (nn.Identity here), ConvNeXt pools and applies its classifier (LayerNorm2d, flatten)."""
    if callable(run_rest := getattr(backbone, "after_stages", None)):
        return run_rest(hidden)  # a timm model (TimmBackbone)
    pool = getattr(backbone, "avgpool", None)  # MobileNetV2 pools in its forward
    pooled = pool(hidden) if pool is not None else F.adaptive_avg_pool2d(hidden, 1)
    if isinstance(backbone, ConvNeXt):
        return backbone.classifier(pooled)
    return backbone.classifier(torch.flatten(pooled, 1))


def build_network(
    backbone: str,
    pretrained: bool,
    weights_path: str | None,
    freeze_backbone: bool,
    channels_last: bool,
    dropout: float,
    image_size: int,
    name: str | None = None,
) -> CrackNet:
    """The network the model settings (conf/model/) describe; `name` is the timm model
    when backbone is "timm"."""
    extractor, feature_dim = build_feature_extractor(backbone, pretrained, weights_path, name)
    mean, std = normalization(backbone, extractor)
    return CrackNet(
        extractor,
        feature_dim,
        mean,
        std,
        dropout,
        frozen=freeze_backbone,
        channels_last=channels_last,
        hparams=SimpleNamespace(backbone=backbone, name=name, image_size=image_size),
    )
