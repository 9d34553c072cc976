"""Training from a composed Hydra config: the body of train.py (commands/train.py runs it)."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import (
    CSVLogger,
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from omegaconf import DictConfig, OmegaConf

from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.data.feature_cache import cache_wanted
from crack_lightning.data.splits import manifest_rows
from crack_lightning.errors import ConfigError, CrackLightningError
from crack_lightning.io import write_text
from crack_lightning.models.classifier import CrackClassifier
from crack_lightning.training.callbacks import (
    ResumeHint,
    ValidationMetricsInCheckpoints,
    log_run_files,
    saved_checkpoint,
    stored_val_metrics,
)
from crack_lightning.training.check import check_train_settings, resolve_precision
from crack_lightning.training.distributed import ddp_job, start_processes
from crack_lightning.training.resume import (
    changed_data_settings,
    keep_old_manifest,
    manifest_changes,
    reference_run,
    refuse_or_warn,
    resolve_ckpt_path,
    resume_step,
    stored_config,
    undecodable_additions,
)
from crack_lightning.training.run_lock import (
    MANIFEST_NAME,
    METRICS_NAME,
    first_process,
    refuse_replacing,
    replace_run,
)

if TYPE_CHECKING:
    from crack_lightning.models.finetuning import BackboneUnfreeze

log = logging.getLogger(__name__)

# the setting that names a run, per logger class (null in conf/logger/: the run dir's name)
RUN_NAME_SETTINGS = {MLFlowLogger: "run_name", WandbLogger: "name"}


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model the config describes; return the best checkpoint's metrics.

    Cheap checks (data layout, checkpoint path, weights) come before anything slow, so
    a bad setting stops the run at once.
    """
    check_train_settings(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    owner = first_process()  # of the run's processes, the one that owns its directory
    if owner:
        refuse_replacing(output_dir, cfg.get("ckpt_path"), cfg.overwrite)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if owner and cfg.overwrite:
        replace_run(output_dir)
    resumed_run = check_resumed_data_settings(cfg, ckpt_path, output_dir)
    start = None
    if cfg.get("init_from") is not None:  # may add the site and replayed sources to cfg
        from crack_lightning.training.adapt import begin_from, prepare_start

        start = prepare_start(cfg)
    elif cfg.adapt.get("folder_site") is not None:  # set by experiment=adapt only
        raise ConfigError(
            "experiment=adapt needs init_from=RUN/checkpoints/best.ckpt: the trained model "
            "to adapt to the site."
        )

    datamodule: CrackDataModule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model: CrackClassifier = build(cfg.model)
    if start is not None:
        begin_from(start, datamodule, model, cfg.data)
        if start.leaves_photos_out:  # chooses the epochs and threshold: sets them in cfg
            from crack_lightning.training.adapt import choose_by_leaving_out

            choose_by_leaving_out(start, datamodule, cfg)
    callbacks, finetune = build_callbacks(cfg.get("callbacks"), output_dir, model)
    counts = model.parameter_counts()
    later = finetune.parameters_to_unfreeze(model) if finetune is not None else 0
    log.info(
        "Backbone %s: %s frozen, %s trainable parameters%s; %d train / %d val / %d test images",
        cfg.model.backbone,
        f"{counts['frozen']:,}",
        f"{counts['trainable']:,}",
        f" (and {later:,} of the frozen from epoch {finetune.epoch}: callbacks.finetune)"
        if later
        else "",
        *(len(datamodule.split[s]) for s in ("train", "val", "test")),
    )

    loggers: list[Logger] = build_loggers(cfg.get("logger"), ckpt_path, output_dir)
    if not loggers:  # nothing to record learning rates in (logger=none)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    precision = resolve_precision(cfg.trainer.precision)
    trainer: L.Trainer = build(
        cfg.trainer, precision=precision, callbacks=callbacks, logger=loggers or False
    )
    with ddp_job(trainer):
        check_resumed_split(cfg, resumed_run, datamodule, before_cache=True)  # before slow work
        use_feature_cache_if_wanted(datamodule, model, trainer, finetune)
        # after the cache left out the files it could not read, as the stored manifest did
        split_changed = check_resumed_split(cfg, resumed_run, datamodule)
        if trainer.is_global_zero:
            if split_changed and resumed_run == output_dir:
                keep_old_manifest(output_dir / MANIFEST_NAME)
            datamodule.write_manifest(output_dir / MANIFEST_NAME)  # io: a full disk: one line
        log_hyperparameters(trainer, model, cfg)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics, best_epoch = evaluate_best(trainer, model, datamodule, cfg.get("test", True))
    if trainer.is_global_zero:
        write_text(output_dir / METRICS_NAME, json.dumps(metrics, indent=2) + "\n")
        log.info("%s: %s", best_summary(trainer, best_epoch), json.dumps(metrics))
    best = metrics.get("best_checkpoint")
    page = None
    if start is not None:  # only an adaptation writes its before/after page
        from crack_lightning.evaluation.before_after import PAGE_NAME

        page = output_dir / PAGE_NAME
    if cfg.scan_eval_at_end and trainer.is_global_zero and best:
        # the scan code (inference, masks scoring) is loaded only when asked for
        from crack_lightning.evaluation.before_after import before_after, write_before_after
        from crack_lightning.training.photo_scores import SCAN_DIR, scan_validation_photos

        # an adaptation checks its site only: the replayed sources have their tile figures
        site = start.site if start is not None else None
        out = output_dir / SCAN_DIR
        after = scan_validation_photos(datamodule, trainer, best, out, only=site)
        if site is not None and after is not None:
            before = scan_validation_photos(
                datamodule, trainer, str(start.path), out / "before", False, only=site
            )
            write_before_after(
                page,
                before,
                after,
                f"the site's validation photos ({MANIFEST_NAME}): not trained on, but they "
                "chose the checkpoint and its threshold",
            )
            log.info(
                "The validation photos, scanned with init_from and with the adapted model:\n%s"
                "\nOverlays before and after, per photo: %s",
                before_after(before.rows, after.rows),
                page,
            )
    log_run_files(
        trainer,
        [
            (Path(best) if best else None, "checkpoints"),
            (output_dir / METRICS_NAME, "run"),
            (output_dir / MANIFEST_NAME, "run"),
            (page, "run"),
            (output_dir / ".hydra" / "config.yaml", "run"),
        ],
    )
    return metrics


# --- the steps of train(), in its order -------------------------------------------------


def check_resumed_data_settings(
    cfg: DictConfig, ckpt_path: str | None, output_dir: Path
) -> Path | None:
    """When resuming, the run whose split must stay (see resume.py), after its data
    settings were compared with this session's; None for a fresh run."""
    run = reference_run(ckpt_path, output_dir, MANIFEST_NAME)
    stored = stored_config(run, MANIFEST_NAME) if run is not None else None
    if stored is not None:
        changes = changed_data_settings(stored, cfg)
        refuse_or_warn(run, changes, cfg.resume_data_changed == "allow", "the data settings")
    return run


def check_resumed_split(
    cfg: DictConfig, run: Path | None, datamodule: CrackDataModule, before_cache: bool = False
) -> bool:
    """Whether this session's split differs from the resumed run's manifest (refused
    unless resume_data_changed=allow); before the feature cache, less the images it may
    skip (resume.undecodable_additions)."""
    allow = cfg.resume_data_changed == "allow"
    if run is None or (before_cache and allow):
        return False
    stored = run / MANIFEST_NAME
    unsure = undecodable_additions(stored, datamodule.sources) if before_cache else ()
    changes = manifest_changes(stored, manifest_rows(datamodule.sources), unsure=unsure)
    refuse_or_warn(run, changes, allow, "the images or their split")
    return bool(changes)


def build(config: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, re-raising our own errors unwrapped so they print plainly."""
    try:
        return instantiate(config, _convert_="all", **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, CrackLightningError):
            raise err.__cause__ from None
        raise


def build_loggers(
    group: DictConfig | None, resume_from: str | None, output_dir: Path
) -> list[Logger]:
    """The logger group; on resume, TensorBoard drops the events the resumed run replaces.

    An interrupted epoch has logged steps past the checkpoint's. SummaryWriter's
    purge_step marks the restart, so TensorBoard shows each step once: the curve simply
    continues from the checkpoint. The CSV table of a resumed session goes beside the
    first (csv/resumed_at_step_N/metrics.csv), which CSVLogger would otherwise delete. An
    MLflow or W&B run left unnamed is named after the run directory (a sweep's job
    folder, as TensorBoard shows it).
    """
    loggers = []
    for entry in (group or {}).values():
        if entry is None:
            continue
        cls = get_class(entry._target_)
        extra: dict[str, Any] = {}
        if resume_from is not None and issubclass(cls, TensorBoardLogger):
            extra["purge_step"] = resume_step(resume_from)
        if resume_from is not None and issubclass(cls, CSVLogger):
            # a CSVLogger deletes the metrics.csv it finds: each session gets its own
            extra["version"] = f"resumed_at_step_{resume_step(resume_from)}"
        for kind, setting in RUN_NAME_SETTINGS.items():
            if issubclass(cls, kind) and entry.get(setting, "") is None:
                extra[setting] = output_dir.name
        loggers.append(build(entry, **extra))
    return loggers


def build_callbacks(
    group: DictConfig | None, output_dir: Path, model: CrackClassifier
) -> tuple[list[Callback], BackboneUnfreeze | None]:
    """The callbacks group plus the ones every run has, and the callbacks.finetune
    schedule (checked against the model) if there is one."""
    entries = {name: entry for name, entry in (group or {}).items() if entry is not None}
    built = {name: build(entry) for name, entry in entries.items()}
    callbacks = [*built.values(), ResumeHint(output_dir), ValidationMetricsInCheckpoints()]
    schedule = built.get("finetune")
    if schedule is not None:
        schedule.check(model)
    return callbacks, schedule


def use_feature_cache_if_wanted(
    datamodule: CrackDataModule,
    model: CrackClassifier,
    trainer: L.Trainer,
    finetune: BackboneUnfreeze | None,
) -> None:
    """Train on cached backbone outputs when data.cache_features and the model allow it
    (a frozen backbone, or one whose lower stages stay frozen: feature_cache.py)."""
    if datamodule.hparams.targets == "masks":  # every encoder stage feeds a crack map
        return
    frozen = model.hparams.freeze_backbone
    quick = bool(trainer.fast_dev_run)
    stage = finetune.cached_stage(model.net.backbone) if finetune is not None else None
    setting = datamodule.hparams.cache_features
    if cache_wanted(setting, frozen, finetune is not None, quick, top_only=stage is not None):
        start_processes(trainer)  # under DDP every process fills its share of the cache
        datamodule.use_feature_cache(model.net, trainer.strategy.root_device, stage)


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


def best_summary(trainer: L.Trainer, best_epoch: int | None) -> str:
    """What the run's last line reports: the best epoch (not the last, which may have
    fallen since), by which metric, and that its model is the one kept."""
    callback = trainer.checkpoint_callback
    if best_epoch is None or callback is None or not callback.best_model_path:
        return "No checkpoint was saved; the last weights' metrics"
    epochs = [c.epoch for c in trainer.callbacks if isinstance(c, ValidationMetricsInCheckpoints)]
    last = epochs[0] if epochs else None
    mode = "lowest" if callback.mode == "min" else "highest"
    chosen = f"{mode} {callback.monitor}" if callback.monitor else "no metric watched"
    which = "the last one" if last in (None, best_epoch) else f"the last was epoch {last}"
    return (
        f"Best epoch {best_epoch} ({chosen}; {which}): its model is kept as "
        f"{callback.best_model_path}, its metrics"
    )


def evaluate_best(
    trainer: L.Trainer, model: CrackClassifier, datamodule: CrackDataModule, test: bool
) -> tuple[dict[str, float | str | None], int | None]:
    """The best checkpoint's metrics (the last weights' if none was saved) and its epoch:
    its validation metrics as stored with it (ValidationMetricsInCheckpoints), its test
    metrics by a test pass; the validation pass runs again only for a checkpoint without
    stored metrics.

    A separate trainer without loggers evaluates, so TensorBoard's curves end at the
    last training epoch instead of gaining a repeated point. Under DDP every process
    must take part (metrics are gathered across them), so the training's own trainer
    does it there, with its loggers detached; Lightning's distributed sampler may then
    repeat a few images to give every process the same number.
    """
    callback = trainer.checkpoint_callback
    ckpt_path = (callback.best_model_path if callback else "") or None
    checkpoint = saved_checkpoint(ckpt_path)
    return _evaluate_checkpoint(trainer, model, datamodule, test, checkpoint, ckpt_path), (
        checkpoint.get("epoch")
    )


def _evaluate_checkpoint(
    trainer: L.Trainer,
    model: CrackClassifier,
    datamodule: CrackDataModule,
    test: bool,
    checkpoint: dict[str, Any],
    ckpt_path: str | None,
) -> dict[str, float | str | None]:
    stored = stored_val_metrics(checkpoint)
    # the callbacks that choose a threshold (SourceMetrics, when configured): test metrics
    # at the best checkpoint's own threshold
    source_metrics = [c for c in trainer.callbacks if hasattr(c, "restore_threshold")]
    for callback in source_metrics:
        callback.restore_threshold(checkpoint)
    if stored is not None and not (test and datamodule.has_test_split):
        return _report(stored, ckpt_path)
    if trainer.world_size > 1:
        with without_loggers(trainer):
            return _evaluate(trainer, model, datamodule, ckpt_path, test, stored)
    evaluator = L.Trainer(
        accelerator=trainer.accelerator,
        devices=1,
        precision=trainer.precision,
        logger=False,
        enable_checkpointing=False,
        callbacks=(
            [copy.copy(trainer.progress_bar_callback)] if trainer.progress_bar_callback else []
        )
        + source_metrics,
        enable_progress_bar=trainer.progress_bar_callback is not None,
        enable_model_summary=False,
    )
    return _evaluate(evaluator, model, datamodule, ckpt_path, test, stored)


def _evaluate(
    evaluator: L.Trainer,
    model: CrackClassifier,
    datamodule: CrackDataModule,
    ckpt_path: str | None,
    test: bool,
    val_metrics: dict[str, float] | None,
) -> dict[str, float | str | None]:
    metrics: dict = dict(val_metrics or {})
    if val_metrics is None:
        metrics |= evaluator.validate(
            model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=True
        )[0]
    if test and datamodule.has_test_split:
        metrics |= evaluator.test(
            model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=True
        )[0]
    return _report(metrics, ckpt_path)


def _report(metrics: dict, ckpt_path: str | None) -> dict[str, float | str | None]:
    report: dict = {k: float(v) for k, v in sorted(metrics.items())}
    report["best_checkpoint"] = ckpt_path
    return report
