"""Callbacks: each epoch's validation metrics kept in checkpoints, how to go on when a run
stops, training's progress lines, the stored threshold, and the checkpoint plugin that
saves through io.py; and what MLflow gets beyond params and metrics. What validation
reports (per source, figures, mistakes) is validation.py's."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.trainer.states import TrainerFn

from crack_lightning.errors import CrackLightningError, RunDirError
from crack_lightning.evaluation.threshold import METADATA_KEY as THRESHOLD_KEY
from crack_lightning.io import load_safely, save_torch
from crack_lightning.progress import duration, interactive
from crack_lightning.settings import OPEN_UNIT, Rule, above
from crack_lightning.training.resume import LAST_CKPT, read_training_checkpoint

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


class ValidationMetricsInCheckpoints(L.Callback):
    """Store each epoch's validation metrics in the checkpoints saved after it, so the
    final report reads the best checkpoint's figures instead of validating it again.

    Lightning runs checkpoint callbacks last, so on_validation_end here sees the epoch's
    metrics before best.ckpt and last.ckpt are written.
    """

    KEY = "val_metrics"

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.epoch = trainer.current_epoch
        self.metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith("val/")
        }

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.epoch == trainer.current_epoch and self.metrics:  # not a stale epoch's
            checkpoint[self.KEY] = dict(self.metrics)


def saved_checkpoint(ckpt_path: str | None) -> dict[str, Any]:
    """A checkpoint this run wrote, read safely; {} when there is none."""
    if ckpt_path is None:
        return {}
    return load_safely(
        ckpt_path, "checkpoint", RunDirError, "It was written by this run; was it moved?"
    )


def stored_val_metrics(checkpoint: dict[str, Any]) -> dict[str, float] | None:
    """The validation metrics a checkpoint was saved with; None if it holds none."""
    return checkpoint.get(ValidationMetricsInCheckpoints.KEY) or None


class ResumeHint(L.Callback):
    """When training stops early (SIGTERM, Ctrl-C, an error), say how to continue.

    Lightning finishes the current batch on SIGTERM and Ctrl-C and stops; the epoch it was
    in is dropped, and last.ckpt (written after every completed epoch) is the resume point.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not trainer.is_global_zero:
            return
        reason = type(exception).__name__
        last = self.run_dir / LAST_CKPT
        if not last.is_file():
            log.warning(
                "Training stopped (%s) before any epoch finished: nothing to resume.", reason
            )
            return
        try:
            epoch = read_training_checkpoint(last)["epoch"]
        except CrackLightningError as err:
            log.warning("Training stopped (%s); %s cannot be resumed from: %s", reason, last, err)
            return
        log.warning(
            "Training stopped (%s) during epoch %d. %s holds epoch %d; continue with the same "
            "settings plus: ckpt_path=last paths.output_dir=%s",
            reason,
            trainer.current_epoch,
            last,
            epoch,
            self.run_dir,
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic in place (io.save_torch: beside the
    target, synced, renamed); remote paths (s3://, ...) keep Lightning's own save, which
    goes through $TMPDIR and a move that is a copy when $TMPDIR is another filesystem
    (tmpfs on many clusters): a SIGKILL during it would leave a truncated last.ckpt."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options "
                f"(got {storage_options!r})."
            )
        save_torch(checkpoint, Path(path))


class LogProgress(ProgressBar):
    """Training progress in short log lines: the position in the epoch every `every_s`
    seconds, the validation metrics after each epoch."""

    def __init__(self, every_s: float) -> None:
        super().__init__()
        self.every_s = every_s
        self.enabled = True
        self.start = self.last = 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    @property
    def is_enabled(self) -> bool:
        return self.enabled

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self.last = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            total = self.total_train_batches
            left = ""
            if isinstance(total, int) and total > i + 1:
                left = f", about {duration((now - self.start) * (total - i - 1) / (i + 1))} left"
            log.info(
                "epoch %d: batch %d/%s, %.0f s%s in the epoch",
                trainer.current_epoch,
                i + 1,
                total,
                now - self.start,
                left,
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        fitting = trainer.state.fn == TrainerFn.FITTING
        where = f"epoch {trainer.current_epoch}" if fitting else "validation"
        took = time.monotonic() - self.start
        later = ""
        epochs_left = (trainer.max_epochs or 0) - trainer.current_epoch - 1
        if fitting and epochs_left > 0:
            later = (
                f"; {epochs_left} more epoch(s) at most (trainer.max_epochs), about "
                f"{duration(took * epochs_left)}"
            )
        log.info("%s: %s, %.0f s%s", where, _format(metrics), took, later)


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items()))


def progress_bar(
    refresh_rate: Annotated[int, Rule("an integer >= 0 (0: silent)", lambda n: n >= 0)],
    line_every_s: Annotated[float, above(0, "seconds")],
) -> ProgressBar:
    """Lightning's tqdm bar on a terminal, LogProgress elsewhere; refresh_rate=0 silences
    either."""
    if interactive():
        return TQDMProgressBar(refresh_rate=refresh_rate)
    bar = LogProgress(line_every_s)
    if refresh_rate == 0:
        bar.disable()
    return bar


class StoredThreshold(L.Callback):
    """Stores a decision threshold chosen before training in every checkpoint, where
    predict and the page read it (evaluation/threshold.py stored_threshold): a crack map's
    adaptation chooses one by leaving each site photo out (training/leave_one_out.py).
    With `save_untrained` (no epoch was chosen: trainer.max_epochs=0), the weights as they
    are become the best checkpoint, so an adaptation always leaves one."""

    def __init__(
        self, threshold: Annotated[float, OPEN_UNIT], rule: str, save_untrained: bool
    ) -> None:
        self.threshold, self.rule, self.save_untrained = threshold, rule, save_untrained

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict
    ) -> None:
        checkpoint[THRESHOLD_KEY] = {"threshold": self.threshold, "rule": self.rule}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saver = trainer.checkpoint_callback
        if self.save_untrained and saver is not None and not saver.best_model_path:
            path = saver.format_checkpoint_name({})
            trainer.save_checkpoint(path)
            saver.best_model_path = path


# --- what MLflow gets beyond params and metrics ---------------------------------------------


def mlflow_loggers(trainer: L.Trainer) -> list[MLFlowLogger]:
    """The trainer's MLflow loggers, on the process that writes (rank 0)."""
    if not trainer.is_global_zero:
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]


def log_figures(trainer: L.Trainer, figures: Mapping[str, Figure], epoch: int) -> None:
    """A validation epoch's figures as MLflow artifacts: figures/epoch_003/val_<name>.png."""
    for logger in mlflow_loggers(trainer):
        for tag, figure in figures.items():
            name = f"figures/epoch_{epoch:03d}/{tag.replace('/', '_')}.png"
            logger.experiment.log_figure(logger.run_id, figure, name)


def log_run_files(trainer: L.Trainer, files: Sequence[tuple[Path | None, str]]) -> None:
    """The run's files (the best checkpoint, metrics.json, ...) as MLflow artifacts, each
    into its folder (checkpoints/, run/); those that do not exist are left out."""
    for logger in mlflow_loggers(trainer):
        for path, folder in files:
            if path is not None and path.is_file():
                logger.experiment.log_artifact(logger.run_id, str(path), folder)
        run = logger.experiment.get_run(logger.run_id)
        log.info("MLflow run %s: artifacts in %s", run.info.run_name, run.info.artifact_uri)
