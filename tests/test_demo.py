"""The offline demo ends where it peaked: its learning rate decays to 0 by the last epoch,
and what a run reports at the end, and keeps, is its best epoch's model, not the last's.

A shortened demo (tiny synthetic images, 3 epochs) whose last epoch is spoiled on purpose
(tests.test_demo.SpoilLastEpoch turns the head's answers around before the last
validation), as the real demo's last epoch once fell to 0.63 after a best of 0.98.
"""

from __future__ import annotations

import csv
import json
import logging

import lightning as L
import pytest
import torch

from crack_lightning.training.run import train

EPOCHS = 3


class SpoilLastEpoch(L.Callback):
    """Swap the head's two logits before the last epoch's validation: its accuracy falls
    to 1 - accuracy, far below the best epoch's."""

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch != trainer.max_epochs - 1:
            return
        linear = pl_module.net.head[-1]
        with torch.no_grad():
            linear.weight.copy_(linear.weight.flip(0))
            linear.bias.copy_(linear.bias.flip(0))


def test_demo_decays_its_learning_rate_to_zero_by_the_last_epoch(make_cfg):
    cfg = make_cfg("experiment=demo")
    assert cfg.model.scheduler._target_ == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert cfg.model.scheduler.T_max == cfg.trainer.max_epochs == 8
    assert cfg.model.pretrained is False and cfg.model.backbone == "resnet18"


def test_a_shortened_demo_reports_and_keeps_its_best_epoch(make_cfg, tmp_path, caplog):
    cfg = make_cfg(
        "experiment=demo",
        "data.synthetic.images_per_class=24",
        "data.synthetic.image_size=64",
        "data.image_size=64",
        "data.batch_size=16",
        f"trainer.max_epochs={EPOCHS}",
        "logger=csv",
        "+callbacks.spoil._target_=tests.test_demo.SpoilLastEpoch",
    )
    caplog.set_level(logging.INFO, logger="crack_lightning.training.run")
    metrics = train(cfg)
    run_dir = tmp_path / "run"
    with (run_dir / "csv" / "metrics.csv").open(newline="") as handle:
        epochs = [row for row in csv.DictReader(handle) if row.get("val/loss")]
    assert [int(row["epoch"]) for row in epochs] == list(range(EPOCHS))
    best = min(epochs, key=lambda row: float(row["val/loss"]))
    last = epochs[-1]
    assert int(best["epoch"]) < EPOCHS - 1  # the spoiled last epoch is not the best
    assert float(last["val/acc"]) < float(best["val/acc"])
    # the final report (metrics.json, the last log line) is the best epoch's, all of it
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    for name, value in best.items():
        if name.startswith("val/"):
            assert metrics[name] == pytest.approx(float(value), abs=1e-6), name
    final = [r for r in caplog.records if r.name == "crack_lightning.training.run"][-1].getMessage()
    assert final.startswith(
        f"Best epoch {best['epoch']} (lowest val/loss; the last was epoch {EPOCHS - 1}): its "
        f"model is kept as {run_dir / 'checkpoints' / 'best.ckpt'}, its metrics: "
    )
    assert json.loads(final.split("its metrics: ", 1)[1]) == metrics
    # and the model kept is that epoch's
    kept = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert kept["epoch"] == int(best["epoch"])
