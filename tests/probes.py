"""Test-only callbacks, added to a run with `+callbacks.NAME._target_=tests.probes.CLASS`
(train.py runs from the repository root, so `tests` is importable in its processes)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch


class Crash(L.Callback):
    """Raise in the middle of an epoch, as a bug or an out-of-memory error would."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("crash in the middle of an epoch (tests.probes.Crash)")


class PauseAt(L.Callback):
    """At (epoch, batch), write `marker` and wait for SIGTERM, so a test can send it at a
    known point in the middle of an epoch."""

    def __init__(self, epoch: int, batch: int, marker: str, timeout_s: float = 120.0) -> None:
        self.epoch = epoch
        self.batch = batch
        self.marker = Path(marker)
        self.timeout_s = timeout_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != self.batch:
            return
        self.marker.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.timeout_s
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


class ParamDigest(L.Callback):
    """Write each process's parameter sums at the start and end of fitting to
    `<directory>/rank<global rank>.json`, to compare DDP processes' weights."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.start: dict[str, float] = {}

    @staticmethod
    def sums(pl_module: L.LightningModule) -> dict[str, float]:
        with torch.no_grad():
            return {
                name: float(p.double().abs().sum() + p.double().sum())
                for name, p in pl_module.named_parameters()
            }

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = self.sums(pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {
            "start": self.start,
            "end": self.sums(pl_module),
            "world_size": trainer.world_size,
            "requires_grad": [n for n, p in pl_module.named_parameters() if p.requires_grad],
        }
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
