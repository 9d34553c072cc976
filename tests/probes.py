"""Test-only callbacks, added to a run with `+callbacks.NAME._target_=tests.probes.CLASS`
(train.py runs from the repository root, so `tests` is importable in its processes)."""

from __future__ import annotations

import json
import os
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


class SaveWeights(L.Callback):
    """Save the model's final weights to `path`: runs that keep no checkpoint
    (fast_dev_run) can then be validated by hand."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.state_dict(), self.path)


def validate_by_hand(cfg, state_dict: dict) -> dict[str, float]:
    """Loss, accuracy at 0.5 and ROC-AUC (by counting pairs) of the model of cfg with
    these weights over the validation loader: what the logged val/* must say."""
    from crack_lightning.training.run import build

    datamodule = build(cfg.data)
    datamodule.setup("fit")
    model = build(cfg.model)
    model.load_state_dict(state_dict)
    model.eval()
    if cfg.data.cache_features is True:  # the run's path: features cached once (or reused)
        datamodule.use_feature_cache(model.net, torch.device("cpu"))
    logits, labels = [], []
    with torch.inference_mode():
        for inputs, label in datamodule.val_dataloader():
            logits.append(model.net.head(model.net.pooled(inputs)))
            labels.append(label)
    logits, labels = torch.cat(logits), torch.cat(labels)
    probs = logits.softmax(-1)[:, 1]
    pos, neg = probs[labels == 1][:, None], probs[labels == 0][None, :]
    pairs = (pos > neg).sum() + 0.5 * (pos == neg).sum()
    return {
        "images": len(labels),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
        "acc": float(((probs >= 0.5).long() == labels).float().mean()),
        "auroc": float(pairs / (pos.numel() * neg.numel())),
    }


class RecordPid(L.Callback):
    """Write the id of the process that trains into `<run dir>/pid.json`, to tell which
    process ran a sweep's job."""

    def on_fit_start(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / "pid.json"
        path.write_text(json.dumps({"pid": os.getpid(), "parent": os.getppid()}))
