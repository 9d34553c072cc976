"""Backbone registry: every model option builds frozen; weights load safely or fail by name."""

from __future__ import annotations

import shutil

import pytest
import torch
from torchvision import models

from crack_lightning.errors import ModelConfigError, WeightsError
from crack_lightning.models.backbones import BACKBONES, TIMM, build_feature_extractor, get_spec
from crack_lightning.models.weights import download_state_dict, load_weights_file
from crack_lightning.training.run import build

from .conftest import CONF_DIR, MODEL_OPTIONS


def test_every_registered_backbone_has_a_model_config():
    configured = {
        line.split(":", 1)[1].strip()
        for name in MODEL_OPTIONS
        for line in (CONF_DIR / "model" / f"{name}.yaml").read_text().splitlines()
        if line.startswith("backbone:")
    }
    assert configured == set(BACKBONES) | {TIMM}  # model=timm: any timm model (test_timm.py)


@pytest.mark.parametrize("option", [o for o in MODEL_OPTIONS if o != "segmenter"])
def test_model_option_builds_frozen_and_classifies_a_batch(make_cfg, option):
    """Every classifier option (the crack-map model: tests/test_segmenter.py)."""
    cfg = make_cfg(f"model={option}", "model.pretrained=false", "data.image_size=64")
    model = build(cfg.model)
    model.train()  # Lightning does this every epoch; the backbone must stay frozen
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    logits = model(images)
    counts = model.parameter_counts()
    print(f"{option}: {counts['frozen']:,} frozen, {counts['trainable']:,} trainable")

    assert logits.shape == (2, 2)
    head_params = sum(p.numel() for p in model.net.head.parameters())
    feature_dim = model.net.head[1].in_features
    assert counts["trainable"] == head_params == (feature_dim + 1) * 2
    assert counts["frozen"] == sum(p.numel() for p in model.net.backbone.parameters()) > 500_000
    assert not model.net.backbone.training
    assert model.net.head.training
    # the frozen forward runs with every BatchNorm folded into its convolution
    folded = model.net.folded_backbone()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())


def test_unknown_backbone_names_the_choices(make_cfg):
    cfg = make_cfg("model.backbone=vgg16", "model.pretrained=false")
    with pytest.raises(ModelConfigError, match="vgg16.*mobilenet_v2.*resnet18"):
        build(cfg.model)


def test_backbone_only_weights_file_loads_exactly(backbone_weights):
    backbone, feature_dim = build_feature_extractor("mobilenet_v2", False, backbone_weights)
    expected = torch.load(backbone_weights, weights_only=True)
    state = backbone.state_dict()
    assert feature_dim == 1280
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_full_torchvision_state_dict_loads_without_its_imagenet_head(tmp_path):
    full = models.resnet18().state_dict()
    assert "fc.weight" in full
    path = tmp_path / "resnet18_full.pth"
    torch.save(full, path)
    backbone, feature_dim = build_feature_extractor("resnet18", False, path)
    assert feature_dim == 512
    state = backbone.state_dict()
    assert "fc.weight" not in state
    assert torch.equal(state["conv1.weight"], full["conv1.weight"])


def test_weights_of_another_backbone_are_refused_naming_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match=r"missing keys \(\d+\): features\.0\.0\.weight") as info:
        build_feature_extractor("mobilenet_v2", False, path)
    assert "unexpected keys" in str(info.value) and "bn1.bias" in str(info.value)


def test_weights_with_a_wrong_shape_are_refused_naming_the_key(tmp_path, backbone_weights):
    state = dict(torch.load(backbone_weights, weights_only=True))
    state["features.1.conv.1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"shape mismatches \(1\): features\.1\.conv\.1\.weight"):
        build_feature_extractor("mobilenet_v2", False, path)


def test_missing_or_unreadable_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="model.weights_path=.*does not exist"):
        load_weights_file(tmp_path / "nope.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="could not be read as a tensors-only PyTorch file"):
        load_weights_file(text)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        load_weights_file(listing)


def test_download_fetches_a_file_url_and_caches_it(tmp_path, monkeypatch, backbone_weights):
    source = tmp_path / "server" / "mobilenet_v2-b0353104.pth"
    source.parent.mkdir()
    shutil.copy(backbone_weights, source)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    state = download_state_dict(source.as_uri())
    assert (tmp_path / "hub" / "checkpoints" / source.name).is_file()
    expected = torch.load(backbone_weights, weights_only=True)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_pretrained_true_uses_torchvision_weights_from_the_hub_cache(
    tmp_path, monkeypatch, backbone_weights
):
    """The real pretrained path, offline: torch.hub finds the file already in its cache."""
    url = models.get_weight(get_spec("mobilenet_v2").weights).url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    shutil.copy(backbone_weights, cached)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    backbone, _ = build_feature_extractor("mobilenet_v2", True, None)
    expected = torch.load(backbone_weights, weights_only=True)
    assert torch.equal(
        backbone.state_dict()["features.0.0.weight"], expected["features.0.0.weight"]
    )


def test_offline_download_says_how_to_use_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    # port 9 (discard) on loopback: nothing listens, the connection is refused at once
    with pytest.raises(WeightsError) as info:
        download_state_dict("http://127.0.0.1:9/models/mobilenet_v2-b0353104.pth")
    message = str(info.value)
    assert "model.weights_path=/path/to/mobilenet_v2-b0353104.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
