"""Training from a composed Hydra config: the body of train.py."""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.errors import CrackLightningError, ModelConfigError
from crack_lightning.models.classifier import CrackClassifier
from crack_lightning.models.finetuning import BackboneUnfreeze
from crack_lightning.runtime import quiet_logs, tune_malloc
from crack_lightning.training.callbacks import ResumeHint
from crack_lightning.training.distributed import ddp_job
from crack_lightning.training.resume import resolve_ckpt_path, resume_step
from crack_lightning.training.run_lock import run_dir_lock

log = logging.getLogger(__name__)

MANIFEST_NAME = "split_manifest.csv"
METRICS_NAME = "metrics.json"


def build(config: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, re-raising our own errors unwrapped so they print plainly."""
    try:
        return instantiate(config, _convert_="all", **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, CrackLightningError):
            raise err.__cause__ from None
        raise


def build_group(group: DictConfig | None) -> list:
    """Instantiate each non-null entry of a callbacks/logger config group."""
    return [build(entry) for entry in (group or {}).values() if entry is not None]


def build_loggers(group: DictConfig | None, resume_from: str | None) -> list[Logger]:
    """The logger group; on resume, TensorBoard drops the events the resumed run replaces.

    An interrupted epoch has logged steps past the checkpoint's. SummaryWriter's
    purge_step marks the restart, so TensorBoard shows each step once: the curve simply
    continues from the checkpoint.
    """
    loggers = []
    for entry in (group or {}).values():
        if entry is None:
            continue
        extra = {}
        if resume_from is not None and issubclass(get_class(entry._target_), TensorBoardLogger):
            extra["purge_step"] = resume_step(resume_from)
        loggers.append(build(entry, **extra))
    return loggers


def build_model(model_cfg: DictConfig) -> tuple[CrackClassifier, BackboneUnfreeze | None]:
    """The LightningModule, and the fine-tuning callback when model.finetune.epoch is set."""
    model: CrackClassifier = build(model_cfg)
    finetune = model.hparams.get("finetune")
    if finetune is None or finetune.get("epoch") is None:
        return model, None
    schedule = BackboneUnfreeze.from_config(finetune)
    schedule.check(model)
    return model, schedule


def log_hyperparameters(trainer: L.Trainer, model: CrackClassifier, cfg: DictConfig) -> None:
    """Send the whole resolved config (and parameter counts) to every logger."""
    hparams = {
        key: OmegaConf.to_container(cfg[key], resolve=True)
        for key in ("data", "model", "trainer", "callbacks")
    }
    hparams["seed"] = cfg.get("seed")
    hparams["params"] = model.parameter_counts()
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)


@contextmanager
def without_loggers(trainer: L.Trainer) -> Iterator[L.Trainer]:
    """The trainer with its loggers detached, so an evaluation adds no point to the curves."""
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        yield trainer
    finally:
        trainer.loggers = loggers


def evaluate_best(
    trainer: L.Trainer, model: CrackClassifier, datamodule: CrackDataModule, test: bool
) -> dict[str, float | str | None]:
    """Validate (and test) the best checkpoint; the last weights if none was saved.

    A separate trainer without loggers does this, so TensorBoard's curves end at the
    last training epoch instead of gaining a repeated point. Under DDP every process
    must take part (metrics are gathered across them), so the training's own trainer
    does it there, with its loggers detached; Lightning's distributed sampler may then
    repeat a few images to give every process the same number.
    """
    callback = trainer.checkpoint_callback
    ckpt_path = (callback.best_model_path if callback else "") or None
    if trainer.world_size > 1:
        with without_loggers(trainer):
            return _evaluate(trainer, model, datamodule, ckpt_path, test)
    evaluator = L.Trainer(
        accelerator=trainer.accelerator,
        devices=1,
        precision=trainer.precision,
        logger=False,
        enable_checkpointing=False,
        callbacks=[TQDMProgressBar()] if trainer.progress_bar_callback else [],
        enable_progress_bar=trainer.progress_bar_callback is not None,
        enable_model_summary=False,
    )
    return _evaluate(evaluator, model, datamodule, ckpt_path, test)


def _evaluate(
    evaluator: L.Trainer,
    model: CrackClassifier,
    datamodule: CrackDataModule,
    ckpt_path: str | None,
    test: bool,
) -> dict[str, float | str | None]:
    metrics: dict = dict(
        evaluator.validate(
            model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=True
        )[0]
    )
    if test and datamodule.has_test_split:
        metrics |= evaluator.test(
            model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=True
        )[0]
    metrics = {k: float(v) for k, v in sorted(metrics.items())}
    metrics["best_checkpoint"] = ckpt_path
    return metrics


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model the config describes; return the best checkpoint's metrics.

    Cheap checks (data layout, checkpoint path, weights) come before anything slow, so
    a bad setting stops the run at once.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)

    datamodule: CrackDataModule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model, finetune = build_model(cfg.model)
    counts = model.parameter_counts()
    log.info(
        "Backbone %s: %s frozen, %s trainable parameters; %d train / %d val / %d test images",
        cfg.model.backbone,
        f"{counts['frozen']:,}",
        f"{counts['trainable']:,}",
        *(len(datamodule.split[s]) for s in ("train", "val", "test")),
    )

    callbacks: list[Callback] = build_group(cfg.get("callbacks"))
    callbacks += [ResumeHint(output_dir)] + ([finetune] if finetune else [])
    loggers: list[Logger] = build_loggers(cfg.get("logger"), resume_from=ckpt_path)
    if not loggers:  # nothing to record learning rates in (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if datamodule.hparams.cache_features:
        if not model.hparams.freeze_backbone or finetune:
            raise ModelConfigError(
                "data.cache_features=true needs a backbone that stays frozen "
                "(model.freeze_backbone=true, model.finetune.epoch=null): features of a "
                "backbone that trains change every step."
            )
        datamodule.use_feature_cache(model.net, trainer.strategy.root_device)
    if trainer.is_global_zero:
        datamodule.write_manifest(output_dir / MANIFEST_NAME)
    log_hyperparameters(trainer, model, cfg)

    with ddp_job(trainer):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = evaluate_best(trainer, model, datamodule, test=cfg.get("test", True))
    if trainer.is_global_zero:
        (output_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("Best checkpoint's metrics: %s", json.dumps(metrics))
    return metrics


def main(cfg: DictConfig) -> float | None:
    """Hydra task: train, print user errors without a traceback, return optimized_metric."""
    tune_malloc()
    quiet_logs()
    if HydraConfig.initialized():  # in a multirun each job has its own directory
        with open_dict(cfg):
            cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    try:
        with run_dir_lock(Path(cfg.paths.output_dir)):
            metrics = train(cfg)
    except CrackLightningError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:  # Lightning stopped after the current batch
        raise SystemExit(128 + signal.SIGTERM) from None
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        log.warning("optimized_metric=%s is not among the metrics %s", name, sorted(metrics))
    return metrics.get(name) if name else None
