"""The LightningModule: frozen backbone semantics, preprocessing, optimiser settings."""

from __future__ import annotations

import pytest
import torch

from crack_lightning.errors import ModelConfigError
from crack_lightning.training.run import build, train


@pytest.fixture
def model(make_cfg, backbone_weights):
    cfg = make_cfg(f"model.weights_path={backbone_weights}", "data.image_size=64")
    return build(cfg.model)


def test_a_training_step_changes_only_the_head(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = model.configure_optimizers()["optimizer"]
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1] * 4))
    loss.backward()
    optimizer.step()

    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {
        "net.head.1.weight",
        "net.head.1.bias",
    }  # BN running stats included in "same"
    assert all(p.grad is None for p in model.net.backbone.parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2


def test_uint8_and_unit_float_inputs_are_normalised_alike(model):
    model.eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.allclose(model(images), model(images.float() / 255), atol=1e-5)


def test_frozen_backbone_runs_batchnorm_folded_with_the_same_features(model):
    net = model.net
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        plain = net.backbone(net.normalize(images))
    folded = net.features(images)
    assert net._folded and torch.allclose(folded, plain, rtol=1e-4, atol=1e-4)

    # new weights: the folded copy is rebuilt from them
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["backbone.features.0.1.running_mean"] += 1.0
    net.load_state_dict(state)
    assert not net._folded
    with torch.no_grad():
        shifted = net.backbone(net.normalize(images))
    assert torch.allclose(net.features(images), shifted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(shifted, plain, atol=1e-3)

    net.frozen = False  # fine-tuning: the real backbone runs, with gradients
    assert not net._folded
    net.backbone.requires_grad_(True)
    assert net.features(images).requires_grad and not net._folded


def test_checkpoint_hparams_are_plain_values(model):
    assert set(model.hparams) >= {"backbone", "lr", "image_size", "weights_path"}
    assert all(
        isinstance(v, (str, int, float, bool, type(None), dict)) for v in model.hparams.values()
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.scheduler._target_=torch.optim.lr_scheduler.Linear",
            r"model.scheduler._target_=torch.optim.lr_scheduler.Linear cannot be imported",
        ),
        (
            "+model.scheduler.step=3",
            r"model.scheduler: torch.optim.lr_scheduler.StepLR takes no setting 'step'; "
            r"it takes step_size, gamma",
        ),
        (
            "+model.optimizer.momentum=0.9",
            r"model.optimizer: torch.optim.Adam takes no setting 'momentum'",
        ),
    ],
)
def test_bad_optimizer_and_scheduler_settings_fail_before_training(
    make_cfg, tmp_path, override, message
):
    cfg = make_cfg(f"data.root={tmp_path / 'missing'}", "model/scheduler=step", override)
    with pytest.raises(ModelConfigError, match=message):
        train(cfg)


def test_sgd_with_momentum_and_a_schedule_need_no_code(make_cfg):
    cfg = make_cfg(
        "model.pretrained=false",
        "model=mobilenetv3_small",
        "model.optimizer._target_=torch.optim.SGD",
        "+model.optimizer.momentum=0.9",
        "model.lr=0.05",
        "model/scheduler=step",
        "model.scheduler.step_size=1",
        "model.scheduler.gamma=0.5",
    )
    model = build(cfg.model)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["lr"] == 0.05
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "epoch"
    assert model.hparams.optimizer == {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": 0.05,
        "weight_decay": 0.0,
        "momentum": 0.9,
    }
