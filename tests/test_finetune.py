"""Fine-tuning schedule: which blocks unfreeze and when, their learning rate, BatchNorm
behaviour, schedulers, and resuming after the unfreeze epoch (Lightning issue #21901)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from crack_lightning.errors import ConfigError
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.models.backbones import BACKBONES, build_feature_extractor
from crack_lightning.models.finetuning import BackboneUnfreeze, backbone_blocks
from crack_lightning.models.network import build_network
from crack_lightning.training.run import build, train

from .conftest import SMALL, compose_config

BLOCK_COUNTS = {
    "mobilenet_v2": 19,
    "mobilenet_v3_large": 17,
    "mobilenet_v3_small": 13,
    "resnet18": 5,
    "resnet50": 5,
    "efficientnet_b0": 9,
    "convnext_tiny": 8,
}
# mobilenet_v3_small's last 2 of 13 blocks: features.11 and features.12
TOP_BLOCKS = ("features.11.", "features.12.")
# a convolution of each, which every step updates
CONV_WEIGHTS = {"features.11.block.0.0.weight", "features.12.0.weight"}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_blocks_cover_every_parameter_once(name):
    backbone, _ = build_feature_extractor(name, pretrained=False, weights_path=None)
    blocks = backbone_blocks(backbone)
    assert len(blocks) == BLOCK_COUNTS[name]
    in_blocks = [id(p) for block in blocks for m in block for p in m.parameters()]
    assert sorted(in_blocks) == sorted(id(p) for p in backbone.parameters())


@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A seeded random mobilenet_v3_small backbone as a weights file: known start weights."""
    torch.manual_seed(0)
    backbone, _ = build_feature_extractor("mobilenet_v3_small", False, None)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "backbone.pth"
    torch.save(state, path)
    return path, state


def backbone_state(ckpt: dict) -> dict[str, torch.Tensor]:
    prefix = "net.backbone."
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def is_top(key: str) -> bool:
    return key.startswith(TOP_BLOCKS)


def bn_keys(state: dict[str, torch.Tensor]) -> set[str]:
    """Keys of BatchNorm layers (they are the ones with running statistics)."""
    layers = {k.rsplit(".", 1)[0] for k in state if k.endswith("running_mean")}
    return {k for k in state if k.rsplit(".", 1)[0] in layers}


def adam_steps(ckpt: dict, group: int) -> list[int]:
    optimizer = ckpt["optimizer_states"][0]
    return [int(optimizer["state"][i]["step"]) for i in optimizer["param_groups"][group]["params"]]


def finetune_cfg(synthetic_cfg, weights: Path, *overrides: str):
    return synthetic_cfg(
        f"model.weights_path={weights}",
        "callbacks/finetune=unfreeze",
        "callbacks.finetune.epoch=1",
        "callbacks.finetune.blocks=2",
        "callbacks.finetune.lr=5e-4",
        *overrides,
    )


def test_unfreezes_the_top_blocks_at_the_epoch_and_resuming_after_keeps_them_learning(
    synthetic_cfg, random_backbone, tmp_path, caplog
):
    """BatchNorm frozen (the default), with a plateau scheduler; then resumed for an epoch.
    The run's first line counts the parameters the schedule unfreezes as it does then."""
    weights, initial = random_backbone
    first = finetune_cfg(
        synthetic_cfg,
        weights,
        "trainer.max_epochs=2",
        "model/scheduler=plateau",
        "model.scheduler.patience=0",
        "model.scheduler.factor=0.5",
        f"paths.output_dir={tmp_path / 'first'}",
    )
    with caplog.at_level("INFO"):
        train(first)
    said = [record.getMessage() for record in caplog.records]
    announced = next(
        re.search(r"and ([\d,]+) of the frozen from epoch 1", m) for m in said if "Backbone" in m
    )
    done = next(
        re.search(r"unfroze the last 2 backbone blocks \(([\d,]+) parameters", m)
        for m in said
        if "unfroze" in m
    )
    assert announced and done and announced[1] == done[1]
    ckpt = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)
    state = backbone_state(ckpt)
    bn = bn_keys(state)
    trainable = {k for k in state if is_top(k) and k not in bn}
    changed = {k for k in state if not torch.equal(state[k], initial[k])}
    # only the top 2 blocks' weights (not their BatchNorm scale, shift or statistics)
    assert CONV_WEIGHTS <= changed <= trainable
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g.get("name") for g in groups] == [None, "backbone"]
    assert len(groups[1]["params"]) == len(trainable)
    assert groups[1]["initial_lr"] == 5e-4
    # 5 steps per epoch: the head trained both epochs, the blocks from epoch 1 only
    assert set(adam_steps(ckpt, 0)) == {10} and set(adam_steps(ckpt, 1)) == {5}
    assert len(ckpt["lr_schedulers"][0]["min_lrs"]) == 2

    second = finetune_cfg(
        synthetic_cfg,
        weights,
        "trainer.max_epochs=3",
        "model/scheduler=plateau",
        "model.scheduler.patience=0",
        "model.scheduler.factor=0.5",
        f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}",
        f"paths.output_dir={tmp_path / 'second'}",
    )
    train(second)
    resumed = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)
    after = backbone_state(resumed)
    # the unfrozen blocks kept learning in the resumed epoch; BatchNorm stayed put
    assert CONV_WEIGHTS <= {k for k in after if not torch.equal(after[k], state[k])} <= trainable
    assert set(adam_steps(resumed, 1)) == {10}
    assert [g.get("name") for g in resumed["optimizer_states"][0]["param_groups"]] == [
        None,
        "backbone",
    ]


def test_train_bn_true_trains_the_unfrozen_blocks_batchnorm_with_a_cosine_schedule(
    synthetic_cfg, random_backbone
):
    weights, initial = random_backbone
    cfg = finetune_cfg(
        synthetic_cfg,
        weights,
        "trainer.max_epochs=2",
        "callbacks.finetune.train_bn=true",
        "model/scheduler=cosine",
    )
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    state = backbone_state(ckpt)
    changed = {k for k in state if not torch.equal(state[k], initial[k])}
    top_bn = {k for k in bn_keys(state) if is_top(k)}
    # running statistics, batch counters, scale and shift of the top blocks' BatchNorm
    assert top_bn and top_bn <= changed
    assert all(is_top(k) for k in changed)  # lower blocks: weights and statistics intact
    assert len(ckpt["lr_schedulers"][0]["base_lrs"]) == 2
    head_lr, block_lr = (g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"])
    # the blocks' group follows the cosine curve from where it joined (epoch 1 of 2)
    assert block_lr < 5e-4 and head_lr < 1e-3


def test_a_frozen_part_stays_in_eval_mode_after_unfreezing(random_backbone, make_cfg):
    """CrackNet.train() forces only what is still frozen into eval mode."""
    from crack_lightning.models.finetuning import BackboneUnfreeze
    from crack_lightning.training.run import build

    weights, _ = random_backbone
    cfg = make_cfg("model=mobilenetv3_small", f"model.weights_path={weights}")
    for train_bn in (False, True):
        model = build(cfg.model)
        schedule = BackboneUnfreeze(epoch=0, blocks=2, lr=1e-4, train_bn=train_bn)
        schedule.freeze_before_training(model)
        schedule.unfreeze(model)
        model.train()
        for name, module in model.net.backbone.named_modules():
            if not name.startswith("features."):
                continue
            top = is_top(name + ".")
            expected = top and (train_bn or not isinstance(module, nn.BatchNorm2d))
            assert module.training == expected, (train_bn, name)
        assert model.net.frozen is False
        assert all(p.requires_grad for p in model.net.head.parameters())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "callbacks.finetune.blocks=0",
            r"callbacks.finetune.blocks=0 must be a number of blocks >= 1",
        ),
        ("callbacks.finetune.blocks=14", r"'mobilenet_v3_small' has 13 blocks; use at most 13"),
        (
            "callbacks.finetune.epoch=-1",
            r"callbacks.finetune.epoch=-1 must be an epoch number >= 0",
        ),
        ("callbacks.finetune.lr=0", r"callbacks.finetune.lr=0.0 must be a learning rate > 0"),
        ("model.freeze_backbone=false", r"model.freeze_backbone=false: the backbone already"),
        (
            "+callbacks.finetune.layers=2",
            r"callbacks.finetune: .*BackboneUnfreeze takes no setting 'layers'; it takes epoch",
        ),
    ],
)
def test_bad_finetune_settings_stop_before_training(synthetic_cfg, override, message):
    cfg = synthetic_cfg("callbacks/finetune=unfreeze", "callbacks.finetune.epoch=1", override)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_stage_outputs_finished_by_the_top_stages_give_the_image_path_features():
    """What the cache stores (stage_output) and what training runs on it (from_stage) add
    up to the backbone on images: the cached path trains the same network."""
    torch.manual_seed(0)
    model = build(compose_config("train", [*SMALL, "model.dropout=0.0"]).model).eval()
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    for stage in (5, 11):
        hidden = model.net.stage_output(images, stage)
        assert hidden.shape[0] == 4 and hidden.ndim == 4
        finished = model.net.from_stage(hidden.clone(), stage)
        torch.testing.assert_close(finished, model.net.features(images), rtol=1e-4, atol=1e-4)
    assert isinstance(model.net.backbone.features, nn.Sequential)
    assert len(model.net.backbone.features) == 13  # from_stage leaves the backbone whole


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "convnext_tiny"])
def test_every_staged_torchvision_backbone_finishes_stage_outputs_as_on_images(name):
    """from_stage runs what each backbone runs after its stages (pooling, ConvNeXt's
    LayerNorm), so cached stage outputs train the same network on any of them."""
    torch.manual_seed(0)
    net = build_network(name, False, None, True, True, 0.0, 32).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    features = net.features(images)
    for stage in (1, len(net.backbone.features) - 1):
        finished = net.from_stage(net.stage_output(images, stage).clone(), stage)
        torch.testing.assert_close(finished, features, rtol=1e-4, atol=1e-4)


def test_only_a_top_part_unfrozen_from_the_first_epoch_can_be_cached():
    backbone, _ = build_feature_extractor("mobilenet_v3_small", False, None)
    resnet, _ = build_feature_extractor("resnet18", False, None)

    def stage(epoch: int, blocks: int | str, net: nn.Module = backbone) -> int | None:
        return BackboneUnfreeze(epoch=epoch, blocks=blocks, lr=1e-4, train_bn=False).cached_stage(
            net
        )

    assert stage(0, 2) == 11 and stage(0, 12) == 1
    assert stage(1, 2) is None  # a frozen first phase trains the head on images
    assert stage(0, "all") is None and stage(0, 13) is None
    assert stage(0, 2, resnet) is None  # stages not in `features`


def test_top_stages_train_on_cached_stage_outputs_from_the_first_epoch(
    synthetic_cfg, random_backbone, tmp_path
):
    weights, initial = random_backbone
    cfg = synthetic_cfg(
        f"model.weights_path={weights}",
        "callbacks/finetune=unfreeze",
        "callbacks.finetune.epoch=0",
        "callbacks.finetune.blocks=2",
        "callbacks.finetune.lr=5e-4",
        "data.cache_features=auto",
        "trainer.max_epochs=2",
        "callbacks.feature_stats={_target_: "
        "crack_lightning.training.feature_stats.FeatureStatistics, max_images: 64}",
    )
    train(cfg)
    [cache] = (tmp_path / "cache" / "features").glob("features_*.pt")
    stored = torch.load(cache, weights_only=True)["features"]
    # (views, images, channels, height, width): the output of features[:11] at 64 px
    assert stored.ndim == 5 and stored.shape[2:] == (96, 2, 2)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    state = backbone_state(ckpt)
    trainable = {k for k in state if is_top(k) and k not in bn_keys(state)}
    changed = {k for k in state if not torch.equal(state[k], initial[k])}
    assert CONV_WEIGHTS <= changed <= trainable
    # 5 steps per epoch, the blocks from the first
    assert set(adam_steps(ckpt, 1)) == {10}
    # the unfamiliar score describes the frozen stages' pooled output, which training
    # leaves as it was; scans compute it on the way to P(crack)
    stats = ckpt["feature_stats"]
    assert int(stats["stage"]) == 11 and stats["mean"].shape == (96,)
    classifier = load_classifier(tmp_path / "run" / "checkpoints" / "last.ckpt", device="cpu")
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    probs, scores = classifier.predict_unfamiliar(images)
    assert np.allclose(probs, classifier.predict(images), atol=1e-4)
    assert scores.shape == (3,) and np.isfinite(scores).all()
