"""LightningModule: training of the crack-map network (models/crack_map.py) on photos with
crack masks, and on labelled crops that say less: a not-crack crop is a photo whose mask is
empty, a crack crop says that its strongest pixel is crack (data/masks.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from crack_lightning.data.masks import CRACK, UNKNOWN
from crack_lightning.errors import ModelConfigError
from crack_lightning.evaluation.crack_maps import tolerant_figures
from crack_lightning.evaluation.threshold import DEFAULT_THRESHOLD
from crack_lightning.models.crack_map import CrackMapNet, build_map_network, tile_scores
from crack_lightning.models.training_module import (
    LEARNING_RATE,
    WEIGHT_DECAY,
    EpochScores,
    TrainingModule,
)
from crack_lightning.settings import Rule, within

# the encoder's trained blocks learn this much slower than the decoder
ENCODER_LR_FACTOR = 0.1
DECODER_CHANNELS = Rule(
    "five channel counts >= 1, one per decoder stage",
    lambda v: len(v) == 5 and all(isinstance(c, int) and c >= 1 for c in v),
)


def tolerance_kernel(tolerance: float) -> torch.Tensor:
    """A disc of radius `tolerance` pixels (Euclidean), as a (1, 1, k, k) kernel."""
    radius = int(tolerance)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disc = (offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2) <= tolerance**2
    return disc.float().view(1, 1, 2 * radius + 1, 2 * radius + 1)


def near(pixels: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Pixels within the kernel's disc of a True pixel of `pixels` (N, 1, H, W)."""
    pad = kernel.shape[-1] // 2
    return F.conv2d(pixels.float(), kernel.to(pixels.device), padding=pad) > 0


class PixelCounts(Metric):
    """An epoch's pixel counts with a tolerance (the crack-segmentation measure: a
    predicted pixel is right within `tolerance` px of a true one, a true pixel found within
    `tolerance` px of a predicted one), summed across DDP processes."""

    full_state_update = False

    def __init__(self, tolerance: float, threshold: float) -> None:
        super().__init__()
        self.register_buffer("kernel", tolerance_kernel(tolerance), persistent=False)
        self.threshold = threshold
        for name in ("predicted", "predicted_near", "true", "true_found"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, masks: torch.Tensor) -> None:
        known = masks != UNKNOWN
        predicted = (probs >= self.threshold) & known
        true = (masks == CRACK) & known
        self.predicted += predicted.sum()
        self.predicted_near += (predicted & near(true, self.kernel)).sum()
        self.true += true.sum()
        self.true_found += (true & near(predicted, self.kernel)).sum()

    def compute(self) -> dict[str, float]:
        """Pixel precision, recall and F1 by the one rule of crack-scan-eval's pixel scores
        (evaluation/crack_maps.py tolerant_figures); undefined ones are not logged."""
        figures = tolerant_figures(
            predicted=int(self.predicted),
            matched=int(self.predicted_near),
            crack=int(self.true),
            found=int(self.true_found),
        )
        return {
            f"pixel_{name}": float(figures[name])
            for name in ("precision", "recall", "f1")
            if figures[name] is not None
        }


def trained_blocks(net: CrackMapNet, count: int) -> list[torch.nn.Parameter]:
    """Let the frozen encoder's last `count` blocks train (their BatchNorm statistics stay,
    as the frozen encoder keeps eval mode): a site's surface can reshape the deepest
    features without the few photos rewriting ImageNet's. Their parameters."""
    if count == 0 or not net.frozen:
        return []
    blocks = net.unet.encoder.features[-count:]
    blocks.requires_grad_(True)
    return list(blocks.parameters())


def map_loss(logits: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice over the known pixels (Dice: thin, rare cracks weigh as much as the
    surface around them), plus, for crops known only to hold a crack somewhere, BCE of
    their strongest pixel against crack."""
    known = masks != UNKNOWN
    target = (masks == CRACK).float()
    loss = logits.new_zeros(())
    if known.any():
        pixel = F.binary_cross_entropy_with_logits(logits[known], target[known])
        probs = torch.sigmoid(logits[known])
        dice = 1 - (2 * (probs * target[known]).sum() + 1) / (probs.sum() + target[known].sum() + 1)
        loss = loss + pixel + dice
    somewhere = ~known.flatten(1).any(dim=1) & (labels == 1)
    if somewhere.any():
        strongest = logits[somewhere].flatten(1).amax(dim=1)
        loss = loss + F.binary_cross_entropy_with_logits(strongest, torch.ones_like(strongest))
    return loss


class CrackSegmenter(TrainingModule):
    """Maps uint8 RGB batches to per-pixel crack logits; scores each epoch by pixel F1
    with a tolerance and by tile F1 of its crops under the tile rule."""

    settings_error = ModelConfigError
    # what it learns from (data.targets)
    targets = "masks"

    def __init__(
        self,
        backbone: str,
        pretrained: bool,
        weights_path: str | None,
        freeze_backbone: bool,
        channels_last: bool,
        decoder_channels: Annotated[list[int], DECODER_CHANNELS],
        lr: Annotated[float, LEARNING_RATE],
        weight_decay: Annotated[float, WEIGHT_DECAY],
        scheduler: Mapping | None,
        image_size: int,
        optimizer: Mapping | None,
        # pixels within this distance of a true crack pixel count as found (the usual 2)
        tolerance: Annotated[float, within(0, 10)],
        # a crop is crack when at least this share of its pixels is (the tile rule)
        min_share: Annotated[float, Rule("in (0, 1]", lambda v: 0 < v <= 1)],
        # the frozen encoder's last blocks that train anyway, at ENCODER_LR_FACTOR x lr
        train_encoder_blocks: Annotated[int, within(0, 19, "of MobileNetV2's 19 blocks")],
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = build_map_network(
            backbone,
            pretrained,
            weights_path,
            freeze_backbone,
            channels_last,
            decoder_channels,
            image_size,
        )
        self.encoder_blocks = trained_blocks(self.net, train_encoder_blocks)
        self.tile_metrics = {
            stage: EpochScores(DEFAULT_THRESHOLD) for stage in ("train", "val", "test")
        }
        self.pixel_metrics = {
            stage: PixelCounts(tolerance, DEFAULT_THRESHOLD) for stage in ("val", "test")
        }
        for stage, metric in [*self.tile_metrics.items(), *self.pixel_metrics.items()]:
            self.add_module(f"{stage}_{type(metric).__name__}", metric)

    def _step(self, batch: tuple[torch.Tensor, dict[str, torch.Tensor]], stage: str) -> dict:
        images, targets = batch
        masks, labels = targets["mask"], targets["label"]
        logits = self.net(images)
        loss = map_loss(logits, masks, labels)
        probs = torch.sigmoid(logits.detach())
        tiles = tile_scores(probs, self.hparams.min_share)
        self.tile_metrics[stage].update(tiles, labels)
        if stage in self.pixel_metrics:
            self.pixel_metrics[stage].update(probs, masks)
        self.log_loss(stage, loss, len(labels))
        return {"loss": loss, "probs": tiles}

    def parameter_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        """The decoder at the optimizer's lr, the encoder's trained blocks
        (train_encoder_blocks) at ENCODER_LR_FACTOR of it."""
        slow = {id(p) for p in self.encoder_blocks}
        fast = [p for p in self.parameters() if p.requires_grad and id(p) not in slow]
        return [(fast, 1.0)] + ([(self.encoder_blocks, ENCODER_LR_FACTOR)] if slow else [])

    def epoch_metrics(self, stage: str) -> list[Metric]:
        """Tile scores of the stage's crops and, for val and test, pixel scores."""
        return [self.tile_metrics[stage], *filter(None, [self.pixel_metrics.get(stage)])]
