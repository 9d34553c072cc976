"""Reproducibility (deterministic runs on CPU) and the experiment configs."""

from __future__ import annotations

import pytest
import torch

from crack_lightning.training.run import train

from .conftest import QUIET, compose_config


def test_deterministic_runs_on_cpu_give_identical_metrics_and_weights(synthetic_cfg, tmp_path):
    def run(name: str, *overrides: str) -> tuple[dict, dict]:
        cfg = synthetic_cfg(
            "trainer.deterministic=true",
            f"paths.output_dir={tmp_path / name}",
            *overrides,
        )
        metrics = train(cfg)
        metrics.pop("best_checkpoint")
        state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        return metrics, state["state_dict"]

    first, first_state = run("a")
    second, second_state = run("b")
    assert first == second
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    # a different seed: another head initialisation and other augmentations
    _, other_state = run("c", "seed=7")
    assert not torch.equal(other_state["net.head.1.weight"], first_state["net.head.1.weight"])


@pytest.mark.parametrize(
    ("experiment", "expected"),
    [
        (
            "seed_keras_baseline",
            {
                "model.backbone": "mobilenet_v2",
                "model.freeze_backbone": True,
                "callbacks.finetune": None,
                "model.scheduler": None,
                "model.optimizer._target_": "torch.optim.Adam",
                "model.lr": 1e-3,
                "model.dropout": 0.2,
                "data.image_size": 160,
                "data.batch_size": 32,
                "data.val_fraction": 0.3,
                "callbacks.early_stopping.patience": 3,
                "callbacks.early_stopping.monitor": "val/loss",
            },
        ),
        (
            "best",
            {
                "model.backbone": "mobilenet_v2",
                "model.freeze_backbone": True,
                "callbacks.finetune.epoch": 5,
                "callbacks.finetune.train_bn": False,
                "model.scheduler._target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
                "data.split": "grouped",
            },
        ),
    ],
)
def test_experiment_configs_compose_their_recipe(experiment, expected):
    cfg = compose_config("train", [f"experiment={experiment}", *QUIET])
    for key, value in expected.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value, key
