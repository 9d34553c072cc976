"""Training progress: tqdm bars on a terminal; in a log file a line every so many
seconds and one per epoch, where bars would write a line per batch."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from crack_lightning.progress import interactive

log = logging.getLogger(__name__)


class LogProgress(ProgressBar):
    """Short log lines: the position in the epoch every `every_s` seconds, the validation
    metrics after each epoch."""

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
            log.info(
                "epoch %d: batch %d/%s, %.0f s",
                trainer.current_epoch,
                i + 1,
                self.total_train_batches,
                now - self.start,
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        fitting = trainer.state.fn == TrainerFn.FITTING
        where = f"epoch {trainer.current_epoch}" if fitting else "validation"
        log.info("%s: %s, %.0f s", where, _format(metrics), time.monotonic() - self.start)


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items()))


def progress_bar(refresh_rate: int, line_every_s: float) -> ProgressBar:
    """Lightning's tqdm bar on a terminal, LogProgress elsewhere; refresh_rate=0 silences
    either."""
    if interactive():
        return TQDMProgressBar(refresh_rate=refresh_rate)
    bar = LogProgress(line_every_s)
    if refresh_rate == 0:
        bar.disable()
    return bar
