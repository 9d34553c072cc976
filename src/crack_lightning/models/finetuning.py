"""Fine-tuning: a second phase that unfreezes the top of the backbone at a chosen epoch.

The Keras recipes train a new head on a frozen base; some then unfreeze the upper layers
and go on with a lower learning rate. `callbacks/finetune=unfreeze` does that
(conf/callbacks/finetune/unfreeze.yaml, settings under `callbacks.finetune`):
from epoch `epoch` (counted from 0) the last `blocks` blocks of the backbone (or `all`)
train too, as a new optimizer parameter group with its own learning rate `lr`. A
learning-rate scheduler scales that group along with the head's.

BatchNorm (`train_bn`): the unfrozen blocks' BatchNorm layers either stay as they were,
in eval mode with frozen scale and shift, normalising with their ImageNet running
statistics (false, the default: the Keras advice, and the safe choice with the small
batches of a CPU or a single GPU), or train (true): train mode, so the running
statistics follow the crack images, and scale and shift learn. Layers below the
unfrozen blocks always stay frozen and in eval mode.

Resuming a run past the unfreeze epoch keeps the blocks unfrozen and in the optimizer.
Lightning's BaseFinetuning restores the optimizer's parameter groups on resume but not
`requires_grad` (Lightning issue #21901, open), so the blocks would silently stop
learning; this callback records whether it has unfrozen and does it again, before the
optimizer and any DDP wrapper are built.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from crack_lightning.errors import ModelConfigError
from crack_lightning.settings import Rule, above

log = logging.getLogger(__name__)

ALL = "all"
GROUP_NAME = "backbone"


def backbone_blocks(backbone: nn.Module) -> list[list[nn.Module]]:
    """The backbone's stages from input to output, each a list of modules.

    torchvision's MobileNets, EfficientNet and ConvNeXt keep their stages in `features`;
    ResNets in layer1..layer4 after a stem (conv1 + bn1); timm models cut into stages
    (models/timm_backbones.py) in `features` too, after their stem. Modules with
    parameters after the last stage (ConvNeXt's final LayerNorm) belong to the last block.
    """

    def has_parameters(module: nn.Module) -> bool:
        return next(module.parameters(), None) is not None

    blocks: list[list[nn.Module]] = []
    for name, child in backbone.named_children():
        if not has_parameters(child):
            continue
        if name == "features":
            blocks.extend([stage] for stage in child.children() if has_parameters(stage))
        elif name.startswith("layer") or not blocks:
            blocks.append([child])
        else:
            blocks[-1].append(child)
    return blocks


def fitting(trainer: L.Trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING


class BackboneUnfreeze(BaseFinetuning):
    """Unfreeze the last `blocks` backbone blocks (or `all`) at epoch `epoch`, with their
    own learning rate `lr`; `train_bn` says whether their BatchNorm layers train. The
    settings are checked at start-up (settings.FineTuneSettings)."""

    settings_error = ModelConfigError

    def __init__(
        self,
        epoch: Annotated[
            int,
            Rule(
                "an epoch number >= 0 (counted from 0); callbacks.finetune=null keeps the "
                "backbone frozen",
                lambda n: n >= 0,
            ),
        ],
        blocks: Annotated[
            int | str,
            Rule(
                "a number of blocks >= 1 or 'all'",
                lambda b: b == "all" or (isinstance(b, int) and not isinstance(b, bool) and b >= 1),
            ),
        ],
        lr: Annotated[float, above(0, "a learning rate")],
        train_bn: bool,
    ) -> None:
        super().__init__()
        self.epoch = epoch
        self.blocks = blocks
        self.lr = float(lr)
        self.train_bn = train_bn
        self.unfrozen = False
        self._module: L.LightningModule | None = None
        # parameters unfrozen after DDP wrapped the model: DDP does not average their
        # gradients, so on_before_optimizer_step does
        self._sync_by_hand: list[nn.Parameter] = []

    # --- which modules ----------------------------------------------------------------

    def check(self, pl_module: L.LightningModule) -> None:
        """Fail at start-up on a model this schedule cannot apply to."""
        if not pl_module.net.frozen:
            raise ModelConfigError(
                "callbacks.finetune is set but model.freeze_backbone=false: the backbone "
                "already trains whole. Set model.freeze_backbone=true for a frozen first "
                "phase, or callbacks.finetune=null."
            )
        backbone = pl_module.net.backbone
        name = pl_module.hparams.get("name") or pl_module.hparams.backbone
        no_stages = getattr(backbone, "no_stages_reason", None)  # a timm model used whole
        if self.blocks != ALL and no_stages is not None:
            raise ModelConfigError(
                f"callbacks.finetune.blocks={self.blocks} needs a backbone built of stages, "
                f"but timm model {name!r} is used whole ({no_stages}); use "
                f"callbacks.finetune.blocks=all, or a timm model with stages (ResNets, "
                f"ConvNeXt, EfficientNet, MobileNetV3, RegNet, ...)."
            )
        available = len(backbone_blocks(backbone))
        if self.blocks != ALL and self.blocks > available:
            raise ModelConfigError(
                f"callbacks.finetune.blocks={self.blocks}, but backbone "
                f"{name!r} has {available} blocks; use at most {available}, or 'all'."
            )

    def split(self, backbone: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        """(modules that stay frozen, modules to unfreeze)."""
        blocks = backbone_blocks(backbone)
        count = len(blocks) if self.blocks == ALL else int(self.blocks)
        frozen = [m for block in blocks[: len(blocks) - count] for m in block]
        unfrozen = [m for block in blocks[len(blocks) - count :] for m in block]
        return frozen, unfrozen

    def parameters_to_unfreeze(self, pl_module: L.LightningModule) -> int:
        """How many of the frozen parameters this schedule unfreezes (the count its
        epoch's log line gives), for the run's first line."""
        _, unfrozen = self.split(pl_module.net.backbone)
        return sum(
            param.numel()
            for module in unfrozen
            for sub in module.modules()
            if self.train_bn or not isinstance(sub, _BatchNorm)
            for param in sub.parameters(recurse=False)
        )

    def cached_stage(self, backbone: nn.Module) -> int | None:
        """Where cached activations can enter the backbone: the index in
        backbone.features of the first stage that trains, when this schedule unfreezes a
        number of top stages from the first epoch on a backbone built as `features`
        (MobileNets, EfficientNet, ConvNeXt, timm models cut into stages). The stages
        below then compute the same thing every epoch, so data/feature_cache.py computes
        it once; None otherwise."""
        stages = getattr(backbone, "features", None)
        if self.epoch != 0 or self.blocks == ALL or not isinstance(stages, nn.Sequential):
            return None
        _, unfrozen = self.split(backbone)
        index = next((i for i, stage in enumerate(stages) if stage is unfrozen[0]), None)
        return index or None

    # --- freezing and unfreezing ----------------------------------------------------------

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        net = pl_module.net
        net.backbone.requires_grad_(False)
        net.frozen = True
        net.keep_eval = [net.backbone]
        self._module = pl_module
        self.unfrozen = False

    def unfreeze(self, pl_module: L.LightningModule) -> list[nn.Parameter]:
        """Make the top blocks trainable and set which modules train() keeps in eval mode;
        return the parameters that now learn."""
        net = pl_module.net
        frozen, unfrozen = self.split(net.backbone)
        params: list[nn.Parameter] = []
        norms: list[nn.Module] = []
        for module in unfrozen:
            for sub in module.modules():
                if isinstance(sub, _BatchNorm):
                    norms.append(sub)
                    if not self.train_bn:
                        continue
                for param in sub.parameters(recurse=False):
                    param.requires_grad_(True)
                    params.append(param)
        net.frozen = False
        net.keep_eval = frozen + ([] if self.train_bn else norms)
        net.train(net.training)  # apply the modes now
        self.unfrozen = True
        return params

    def finetune_function(
        self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer
    ) -> None:
        if self.unfrozen or epoch < self.epoch:
            return
        params = self.unfreeze(pl_module)
        optimizer.add_param_group(
            {"params": params, "lr": self.lr, "initial_lr": self.lr, "name": GROUP_NAME}
        )
        self._extend_schedulers(pl_module.trainer, optimizer)
        if pl_module.trainer.world_size > 1:
            self._sync_by_hand = params
        log.info(
            "Epoch %d: unfroze the last %s backbone blocks (%s parameters, lr %g, BatchNorm %s)",
            epoch,
            self.blocks,
            f"{sum(p.numel() for p in params):,}",
            self.lr,
            "training" if self.train_bn else "frozen in eval mode",
        )

    @staticmethod
    def _extend_schedulers(trainer: L.Trainer, optimizer: Optimizer) -> None:
        """Give the new parameter group its place in each scheduler's per-group lists."""
        groups = optimizer.param_groups
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if scheduler.optimizer is not optimizer:
                continue
            if hasattr(scheduler, "base_lrs") and len(scheduler.base_lrs) < len(groups):
                scheduler.base_lrs.append(groups[-1]["initial_lr"])
            if isinstance(scheduler, ReduceLROnPlateau) and len(scheduler.min_lrs) < len(groups):
                scheduler.min_lrs.append(scheduler.min_lrs[-1])
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = [group["lr"] for group in groups]

    # --- Lightning hooks ------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # validate/test after training must not freeze the model again
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "unfrozen": self.unfrozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume: unfreeze again at once if the checkpoint was saved after unfreezing.

        Lightning calls this after setup() froze the backbone and before it builds the
        optimizer (whose groups BaseFinetuning.on_fit_start then restores) and any DDP
        wrapper, which so includes the unfrozen parameters.
        """
        super().load_state_dict(state_dict)
        module = self._module
        # Lightning also restores callbacks for validate/test: leave the model alone then
        if state_dict.get("unfrozen") and module is not None and fitting(module.trainer):
            self.unfreeze(module)
            log.info("Resumed after the unfreeze epoch: the last %s blocks train", self.blocks)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> None:
        grads = [p.grad for p in self._sync_by_hand if p.grad is not None]
        if not grads or not torch.distributed.is_initialized():
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= trainer.world_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
