"""Callback: the training images' feature statistics, stored in every checkpoint for
scan's unfamiliar score (the score itself: inference/unfamiliar.py)."""

from __future__ import annotations

from typing import Annotated

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from crack_lightning.data.decode import DecodedImages
from crack_lightning.inference.unfamiliar import CHECKPOINT_KEY, fit_statistics
from crack_lightning.models.finetuning import BackboneUnfreeze
from crack_lightning.settings import at_least

# a backbone frozen throughout is described below its top stages, as the recipe's is
# (MobileNetV2: features[:16]): its last pooled features tell sky from concrete badly
# (docs/generalization.md, "Unfamiliar patches")
TOP_STAGES_LEFT_OUT = 3


class FeatureStatistics(L.Callback):
    """Stores the training images' feature statistics in every checkpoint.

    With cached features they are read from the cache; otherwise up to `max_images`
    training images (evenly spread) go through the backbone once. With the top stages
    fine-tuned on cached activations, they are of the frozen stages' pooled output
    (stats["stage"]); with the backbone frozen throughout, of the pooled output below its
    top TOP_STAGES_LEFT_OUT stages (one pass of up to max_images images through it).
    Computed once while what they describe is frozen, again at each save while it trains.
    """

    def __init__(self, max_images: Annotated[int, at_least(1)]) -> None:
        self.max_images = max_images
        self.stats: dict[str, torch.Tensor] | None = None

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict
    ) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "split"):
            return
        stage = datamodule.feature_stage  # set only while training on cached stage outputs
        if stage is None and not any(isinstance(c, BackboneUnfreeze) for c in trainer.callbacks):
            stage = below_top_stages(pl_module.net.backbone) if pl_module.net.frozen else None
        if self.stats is None or (stage is None and not pl_module.net.frozen):
            self.stats = fit_statistics(self._features(datamodule, pl_module, stage))
            if stage is not None:
                self.stats["stage"] = torch.tensor([stage])
        checkpoint[CHECKPOINT_KEY] = self.stats

    def _features(self, datamodule, pl_module, stage: int | None) -> torch.Tensor:
        """Pooled features (of `stage`'s output, unless None) of up to max_images training
        images (the plain view): cached pooled features, cached stage outputs averaged
        over their positions, or the images through the backbone once."""
        train = datamodule.split["train"]
        step = max(1, len(train) // self.max_images)
        chosen = train[::step][: self.max_images]
        if datamodule.features is not None and stage == datamodule.feature_stage:
            cached = datamodule.features[0, chosen].float()
            return cached if stage is None else cached.mean(dim=(-2, -1))
        paths = [datamodule.samples[i][0] for i in chosen]
        labels = [datamodule.samples[i][1] for i in chosen]
        loader = DataLoader(
            DecodedImages(paths, labels, datamodule.hparams.image_size, on_bad="skip"),
            batch_size=datamodule.hparams.batch_size,
        )
        net = pl_module.net
        was_training = net.training
        net.eval()
        outputs = []
        with torch.inference_mode():
            for images, _ in loader:
                images = images.to(pl_module.device)
                if stage is None:
                    outputs.append(net.features(images).float().cpu())
                else:
                    pooled = net.stage_output(images, stage).mean(dim=(2, 3))
                    outputs.append(pooled.float().cpu())
        net.train(was_training)
        return torch.cat(outputs)


def below_top_stages(backbone: nn.Module) -> int | None:
    """The index in backbone.features below its top TOP_STAGES_LEFT_OUT stages; None for a
    backbone not built as `features` stages (its pooled features are described)."""
    stages = getattr(backbone, "features", None)
    if not isinstance(stages, nn.Sequential) or len(stages) <= TOP_STAGES_LEFT_OUT:
        return None
    return len(stages) - TOP_STAGES_LEFT_OUT
