"""What the classifier (models/classifier.py) and the crack-map model (models/segmenter.py)
share as LightningModules: the steps of each stage, the epoch's metrics logged once at its
end, the optimizer and scheduler from settings, and the parameter counts.

`model.optimizer` (conf/model/_base.yaml; Adam by default) is any `torch.optim` class, or
anything called as `factory(params)`: `model.optimizer._target_=torch.optim.SGD
+model.optimizer.momentum=0.9` needs no code. `model.scheduler` (null, or an option of
conf/model/scheduler/) is called as `factory(optimizer)`; its keys `interval`,
`frequency` and `monitor` go to Lightning (when to step, which metric ReduceLROnPlateau
watches) instead. Checkpoints keep both as plain dicts among the hyper-parameters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn
from torch.optim import Optimizer
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from crack_lightning.errors import ModelConfigError
from crack_lightning.evaluation.metrics import binary_scores, defined
from crack_lightning.settings import Rule, above

# model.lr and model.weight_decay, whichever model takes them
LEARNING_RATE = above(0, "a learning rate")
WEIGHT_DECAY = Rule(">= 0", lambda v: v >= 0)


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


class TrainingModule(L.LightningModule):
    """A network (`self.net`) trained on batches of a stage; subclasses say what a step
    computes (`_step`) and which metrics each stage gathers (`epoch_metrics`)."""

    net: torch.nn.Module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable}

    def _step(self, batch: Any, stage: str) -> dict:
        raise NotImplementedError

    def epoch_metrics(self, stage: str) -> list[Metric]:
        raise NotImplementedError

    def log_loss(self, stage: str, loss: torch.Tensor, batch_size: int) -> None:
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=batch_size,
            sync_dist=True,  # under DDP: averaged over the processes (a no-op otherwise)
        )

    def _log_epoch_metrics(self, stage: str) -> None:
        """Log the epoch's metrics once, at its end, from all of its predictions (gathered
        from every process under DDP): logging them every step would cost Lightning a
        walk over the stored predictions per call, quadratic in the epoch's length.
        Figures undefined for the epoch (ROC-AUC with one class) are not logged."""
        metrics = self.epoch_metrics(stage)
        if not self.trainer.sanity_checking:  # a couple of batches, often of one class
            scores: dict[str, float] = {}
            for metric in metrics:
                scores |= metric.compute()
            self.log_dict({f"{stage}/{k}": v for k, v in scores.items()}, prog_bar=stage == "val")
        for metric in metrics:
            metric.reset()

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

    def parameter_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        """The trainable parameters in groups, each with its factor of the optimizer's lr:
        one group at the optimizer's lr."""
        return [([p for p in self.parameters() if p.requires_grad], 1.0)]

    def configure_optimizers(self) -> dict:
        """model.optimizer over the trainable parameters (parameter_groups), and
        model.scheduler if set."""
        groups = self.parameter_groups()
        optimizer = build_optimizer(
            self.hparams.optimizer or {}, [{"params": p} for p, _ in groups]
        )
        for group, (_, factor) in zip(optimizer.param_groups, groups, strict=True):
            if factor != 1.0:
                group["lr"] = factor * optimizer.defaults["lr"]
        scheduler = build_scheduler(self.hparams.scheduler, optimizer)
        return {"optimizer": optimizer} | ({"lr_scheduler": scheduler} if scheduler else {})


# --- the optimizer and scheduler from `_target_` + `_partial_` configs ---------------------

# model.scheduler keys for Lightning's lr_scheduler config, not for the scheduler itself
LIGHTNING_KEYS = ("interval", "frequency", "monitor")


def scheduler_factory(config: Mapping[str, Any]) -> dict[str, Any]:
    """model.scheduler without the keys that go to Lightning."""
    return {k: v for k, v in config.items() if k not in LIGHTNING_KEYS}


def _call(config: Mapping[str, Any], setting: str, argument: Any) -> Any:
    """instantiate(config)(argument), with errors that name the setting."""
    if "_target_" not in config:
        raise ModelConfigError(
            f"{setting} needs a _target_ (a class such as torch.optim.Adam) and _partial_: "
            f"true; got {dict(config)}. See conf/model/_base.yaml and conf/model/scheduler/."
        )
    try:
        return instantiate(dict(config), _partial_=True)(argument)
    except (InstantiationException, TypeError, ValueError) as err:
        cause = err.__cause__ or err
        raise ModelConfigError(f"{setting} ({config['_target_']}): {cause}") from None


def build_optimizer(config: Mapping[str, Any], params: Iterable[nn.Parameter]) -> Optimizer:
    return _call(config, "model.optimizer", list(params))


def build_scheduler(config: Mapping[str, Any] | None, optimizer: Optimizer) -> dict | None:
    """Lightning's lr_scheduler dict, or None without a scheduler."""
    if config is None:
        return None
    scheduler = _call(scheduler_factory(config), "model.scheduler", optimizer)
    return {"scheduler": scheduler} | {k: config[k] for k in LIGHTNING_KEYS if k in config}
