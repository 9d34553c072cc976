"""train.py's settings, checked before any data is read or model built: every node of
the composed config against the code that takes it (settings.check_settings)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from omegaconf import DictConfig

from crack_lightning.errors import ConfigError, DataError, ModelConfigError
from crack_lightning.models.training_module import LIGHTNING_KEYS
from crack_lightning.settings import Rule, at_least, check_settings

log = logging.getLogger(__name__)
# trainer.precision: the best mixed precision of the GPU found at start-up
AUTO_MIXED = "auto-mixed"
# the sections of conf/train.yaml checked on their own
SECTIONS = ("task_name", "paths", "data", "model", "trainer", "callbacks", "logger", "adapt")
# Lightning's trainer settings that no run here wants outside these ranges (max_epochs=-1
# is "forever" to Lightning)
TRAINER_RULES = {
    "min_epochs": at_least(0),
    "max_epochs": at_least(1),
    "check_val_every_n_epoch": at_least(1),
    "log_every_n_steps": at_least(1),
}
# logger classes (conf/logger/) that need a package not installed by default, and how to
# get it
LOGGER_PACKAGES = {
    "MLFlowLogger": ("mlflow", 'pip install -e ".[mlflow]" (the mlflow-skinny client)'),
    "WandbLogger": ("wandb", "pip install wandb"),
}


@dataclass(frozen=True)
class RunSettings:
    """train.py's own top-level settings (conf/train.yaml)."""

    settings_error = ConfigError
    seed: Annotated[int, Rule("an integer in [0, 4294967295]", lambda v: 0 <= v < 2**32)]
    ckpt_path: str | None
    overwrite: bool
    resume_data_changed: Literal["refuse", "allow"]
    optimized_metric: str
    optimized_direction: Literal["maximize", "minimize"]
    test: bool
    init_from: str | None
    scan_eval_at_end: bool


def check_train_settings(cfg: DictConfig) -> None:
    """Every setting of the run, in the order a reader meets them in conf/train.yaml."""
    from crack_lightning.data.transforms import Augmentation

    check_settings(cfg, RunSettings, "", others=SECTIONS)
    if cfg.get("init_from") is not None:  # adapt.* is read only then
        from crack_lightning.training.adapt import AdaptSettings

        check_settings(cfg.adapt, AdaptSettings, "adapt")
    check_settings(cfg.data, target(cfg.data, "data", DataError), "data")
    if cfg.data.get("augmentation") is None:
        raise DataError(
            "data.augmentation=null: choose a file of conf/data/augmentation/ "
            "(data/augmentation=none for no augmentation)."
        )
    Augmentation.from_config(cfg.data.augmentation)
    check_settings(cfg.model, target(cfg.model, "model", ModelConfigError), "model")
    check_targets(cfg.model, cfg.data.targets)
    check_optimizer(cfg.model)
    values = {k: v for k, v in cfg.trainer.items() if (k, v) != ("precision", AUTO_MIXED)}
    trainer = check_settings(values, target(cfg.trainer, "trainer"), "trainer", rules=TRAINER_RULES)
    if trainer.get("min_epochs", 0) > trainer.get("max_epochs", 1):
        raise ConfigError(
            f"trainer.min_epochs={trainer['min_epochs']} must be in "
            f"0..trainer.max_epochs ({trainer['max_epochs']})."
        )
    for name, entry in (cfg.get("callbacks") or {}).items():
        if entry is not None:
            check_settings(entry, target(entry, f"callbacks.{name}"), f"callbacks.{name}")
    for name, entry in (cfg.get("logger") or {}).items():
        if entry is not None:
            check_logger(entry, f"logger.{name}")


def target(node: Mapping, section: str, error: type[Exception] = ConfigError) -> str:
    """The node's `_target_`: the class or function its settings are for."""
    if node.get("_target_") is None:
        raise error(f"{section} needs a _target_ (the class or function it builds).")
    return str(node["_target_"])


def check_targets(model: DictConfig, targets: str) -> None:
    """The model learns from what the data serves: class labels, or crack masks."""
    from hydra.utils import get_class

    wanted = get_class(target(model, "model", ModelConfigError)).targets
    if wanted != targets:
        how = {
            "masks": "model=segmenter with data.targets=masks (experiment=crack_maps sets both)",
            "labels": "a classifier (model=mobilenetv2, ...) with data.targets=labels",
        }
        raise ModelConfigError(
            f"model._target_={model._target_} learns from {wanted}, but data.targets="
            f"{targets}: train {how[wanted]}, or {how[targets]}."
        )


def check_optimizer(model: DictConfig) -> None:
    """model.optimizer and model.scheduler take what their classes take (the trainable
    parameters and the optimizer come from the model, not from settings)."""
    optimizer = model.get("optimizer")
    if optimizer is not None:
        section = "model.optimizer"
        where = target(optimizer, section, ModelConfigError)
        check_settings(optimizer, where, section, ModelConfigError, others=("params",))
    scheduler = model.get("scheduler")
    if scheduler is not None:
        section = "model.scheduler"
        where = target(scheduler, section, ModelConfigError)
        others = ("optimizer", *LIGHTNING_KEYS)
        check_settings(scheduler, where, section, ModelConfigError, others=others)


def check_logger(entry: DictConfig, section: str) -> None:
    """A logger's settings, and the package it needs installed: said before any data is
    read or downloaded."""
    where = target(entry, section)
    check_settings(entry, where, section)
    module, install = LOGGER_PACKAGES.get(where.rsplit(".", 1)[-1], (None, ""))
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{section} needs the `{module}` package, which is not installed: {install}; "
            f"or choose another logger (logger=tensorboard, logger=csv)."
        )


def resolve_precision(precision: str | int) -> str | int:
    """bf16-mixed on GPUs that support bfloat16 (Ampere and later: no loss scaling, fp32's
    range), 16-mixed on older GPUs, 32-true without a GPU; other values pass unchanged."""
    if precision != AUTO_MIXED:
        return precision
    if not torch.cuda.is_available():
        log.info("trainer.precision=%s: no GPU, so 32-true", AUTO_MIXED)
        return "32-true"
    chosen = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    log.info("trainer.precision=%s: %s on %s", AUTO_MIXED, chosen, torch.cuda.get_device_name())
    return chosen
