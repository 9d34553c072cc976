"""timm backbones (model=timm model.name=...): training with the feature cache and with the
top stages fine-tuned on cached stage outputs, weights from a file, the one-line errors
(an unknown name, a hub download without network), export and the cut into stages.

The models are timm's own tiny test networks (test_efficientnet: 99k parameters, built
as a stem and 5 stages), randomly initialised: no download ever."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

timm = pytest.importorskip("timm")

from crack_lightning.commands.export import main as export_main  # noqa: E402
from crack_lightning.errors import ModelConfigError, WeightsError  # noqa: E402
from crack_lightning.inference.classifiers import load_classifier  # noqa: E402
from crack_lightning.models.backbones import build_feature_extractor  # noqa: E402
from crack_lightning.models.finetuning import backbone_blocks  # noqa: E402
from crack_lightning.models.timm_backbones import TimmBackbone  # noqa: E402
from crack_lightning.training.run import build, train  # noqa: E402

from .conftest import compose_config  # noqa: E402

NAME = "test_efficientnet"  # conv_stem + bn1, blocks.0-4, conv_head + bn2: 256 features
TIMM = [
    "data.image_size=64",
    "data.batch_size=8",
    "model=timm",
    f"model.name={NAME}",
    "model.pretrained=false",
    "trainer.max_epochs=1",
]


@pytest.fixture
def timm_cfg(make_cfg, synthetic_root):
    def _make(*overrides: str):
        return make_cfg(f"data.root={synthetic_root}", *TIMM, *overrides)

    return _make


@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A seeded timm model's full state dict (classifier included) as a file."""
    torch.manual_seed(1)
    state = timm.create_model(NAME).state_dict()
    path = tmp_path_factory.mktemp("weights") / f"{NAME}.pth"
    torch.save(state, path)
    return path, state


def timm_key(key: str) -> str:
    """A TimmBackbone's state-dict key as the timm model names it (features.0 is the
    stem, features.k stage blocks.{k-1}, model.* what follows the stages)."""
    if key.startswith("features.0."):
        return key.removeprefix("features.0.")
    if key.startswith("features."):
        index, rest = key.removeprefix("features.").split(".", 1)
        return f"blocks.{int(index) - 1}.{rest}"
    return key.removeprefix("model.")


def backbone_state(ckpt: dict) -> dict[str, torch.Tensor]:
    prefix = "net.backbone."
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def test_a_timm_model_is_cut_into_stem_and_stages_that_add_up_to_it():
    torch.manual_seed(0)
    model = build(compose_config("train", [*TIMM, "model.dropout=0.0"]).model).eval()
    backbone = model.net.backbone
    assert isinstance(backbone, TimmBackbone) and backbone.no_stages_reason is None
    assert len(backbone.features) == 6  # the stem, then the 5 stages
    # conv_head + bn2 after the stages belong to the last block
    assert len(backbone_blocks(backbone)) == 6
    in_blocks = [
        id(p) for block in backbone_blocks(backbone) for m in block for p in m.parameters()
    ]
    assert sorted(in_blocks) == sorted(id(p) for p in backbone.parameters())
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    reference = timm.create_model(NAME, num_classes=0).eval()
    reference.load_state_dict({timm_key(k): v for k, v in backbone.state_dict().items()})
    features = model.net.features(images)  # BatchNorm folded: the same function
    assert features.shape == (4, 256)
    with torch.no_grad():
        torch.testing.assert_close(
            features, reference(model.net.normalize(images)), rtol=1e-4, atol=1e-4
        )
    for stage in (1, 4):
        hidden = model.net.stage_output(images, stage)
        assert hidden.ndim == 4
        finished = model.net.from_stage(hidden.clone(), stage)
        torch.testing.assert_close(finished, features, rtol=1e-4, atol=1e-4)
    assert len(backbone.features) == 6  # put back whole after from_stage


def test_weights_path_loads_a_saved_timm_state_dict(saved_weights, tmp_path):
    path, state = saved_weights
    backbone, dim = build_feature_extractor("timm", False, path, NAME)
    assert dim == 256
    loaded = {timm_key(k): v for k, v in backbone.state_dict().items()}
    # every weight but the classifier's, unchanged
    assert set(loaded) == {k for k in state if not k.startswith("classifier.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    # the hub's format too: model.safetensors
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    again, _ = build_feature_extractor("timm", False, tmp_path / "model.safetensors", NAME)
    assert all(
        torch.equal(a, b) for a, b in zip(again.state_dict().values(), loaded.values(), strict=True)
    )


def test_weights_of_another_model_are_refused_in_one_line(saved_weights):
    path, _ = saved_weights
    with pytest.raises(WeightsError, match="do not fit timm model 'test_resnet'") as err:
        build_feature_extractor("timm", False, path, "test_resnet")
    assert "\n" not in str(err.value)


def test_an_unknown_name_is_one_line_saying_how_to_find_names(timm_cfg):
    cfg = timm_cfg("model.name=convnext_tinyy")
    with pytest.raises(ModelConfigError, match=r"model.name='convnext_tinyy' is not a timm") as err:
        train(cfg)
    assert "Did you mean convnext_tiny" in str(err.value)
    assert "timm.list_models('convnext*')" in str(err.value) and "\n" not in str(err.value)
    assert not Path(cfg.paths.output_dir, "checkpoints").exists()


def test_pretrained_without_network_is_one_line_pointing_to_weights_path(monkeypatch):
    """The hub call is replaced by the error huggingface_hub raises offline."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(*args, **kwargs):
        calls.append(kwargs.get("filename") or args)
        raise LocalEntryNotFoundError(
            "An error happened while trying to locate the file on the Hub and we cannot "
            "find the requested files in the local cache.\nPlease check your connection."
        )

    monkeypatch.setattr("timm.models._hub.hf_hub_download", offline)
    with pytest.raises(WeightsError) as err:
        build_feature_extractor("timm", True, None, NAME)
    message = str(err.value)
    assert calls and "\n" not in message
    assert "Could not download pretrained weights for timm model 'test_efficientnet'" in message
    assert "https://huggingface.co/timm/test_efficientnet" in message
    assert "model.weights_path=/path/to/model.safetensors" in message


def test_frozen_timm_model_trains_on_cached_features_predicts_and_exports(
    timm_cfg, saved_weights, tmp_path
):
    path, state = saved_weights
    cfg = timm_cfg(f"model.weights_path={path}", "data.cache_features=true")
    metrics = train(cfg)
    assert 0.0 <= metrics["val/acc"] <= 1.0
    [cache] = (tmp_path / "cache" / "features").glob("features_*.pt")
    stored = torch.load(cache, weights_only=True)["features"]
    assert stored.shape[-1] == 256 and stored.ndim == 3  # (views, images, pooled features)
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["hyper_parameters"]["name"] == NAME
    frozen = {timm_key(k): v for k, v in backbone_state(ckpt).items()}
    assert all(torch.equal(v, state[k]) for k, v in frozen.items())  # frozen: as loaded
    # predict's loader rebuilds it offline from the checkpoint alone
    classifier = load_classifier(ckpt_path, device="cpu")
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    module = classifier.checkpoint_module.eval()
    with torch.inference_mode():
        expected = module(images).softmax(-1)[:, 1].numpy()
    assert np.allclose(classifier.predict(images), expected, atol=1e-5)
    # crack-export: the whole network as ONNX and TorchScript, the same probabilities
    for fmt in ("onnx", "torchscript"):
        output = tmp_path / f"model.{fmt}"
        assert export_main([f"ckpt_path={ckpt_path}", f"format={fmt}", f"output={output}"]) == 0
        assert np.allclose(load_classifier(output, "cpu").predict(images), expected, atol=1e-5)
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert metadata["backbone"] == f"timm:{NAME}"


def test_top_timm_stages_fine_tune_on_cached_stage_outputs(timm_cfg, saved_weights, tmp_path):
    path, state = saved_weights
    cfg = timm_cfg(
        f"model.weights_path={path}",
        "callbacks/finetune=unfreeze",
        "callbacks.finetune.epoch=0",
        "callbacks.finetune.blocks=2",
        "callbacks.finetune.lr=5e-3",
        "data.cache_features=auto",
        "callbacks.feature_stats={_target_: "
        "crack_lightning.training.feature_stats.FeatureStatistics, max_images: 64}",
    )
    train(cfg)
    [cache] = (tmp_path / "cache" / "features").glob("features_*.pt")
    stored = torch.load(cache, weights_only=True)["features"]
    # (views, images, channels, height, width): the output of features[:4] (stem,
    # blocks.0-2) at 64 px
    assert stored.ndim == 5 and stored.shape[2:] == (32, 8, 8)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    after = {timm_key(k): v for k, v in backbone_state(ckpt).items()}
    changed = {k for k, v in after.items() if not torch.equal(v, state[k])}
    # the last 2 stages (blocks.3-4) and conv_head after them; BatchNorm stays frozen
    top = ("blocks.3.", "blocks.4.", "conv_head.")
    assert changed and all(k.startswith(top) and ".bn" not in k for k in changed)
    assert "conv_head.weight" in changed and any(k.startswith("blocks.3.") for k in changed)
    assert int(ckpt["feature_stats"]["stage"]) == 4
    classifier = load_classifier(tmp_path / "run" / "checkpoints" / "last.ckpt", device="cpu")
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    probs, scores = classifier.predict_unfamiliar(images)
    assert np.allclose(probs, classifier.predict(images), atol=1e-4)
    assert scores.shape == (3,) and np.isfinite(scores).all()


def test_an_image_size_a_fixed_size_model_cannot_take_is_one_line(timm_cfg):
    with pytest.raises(ModelConfigError, match="takes 160x160 images only") as err:
        train(timm_cfg("model.name=test_vit"))
    assert "set data.image_size=160" in str(err.value) and "\n" not in str(err.value)


def test_a_timm_model_without_stages_trains_whole_on_cached_pooled_features(timm_cfg, tmp_path):
    cfg = timm_cfg("model.name=test_vit", "data.image_size=160", "data.cache_features=true")
    model = build(cfg.model)
    assert model.net.backbone.no_stages_reason is not None
    assert not hasattr(model.net.backbone, "features")
    train(cfg)
    [cache] = (tmp_path / "cache" / "features").glob("features_*.pt")
    assert torch.load(cache, weights_only=True)["features"].shape[-1] == 64  # pooled


def test_a_timm_model_without_stages_is_refused_for_fine_tuning_by_stages(timm_cfg):
    cfg = timm_cfg(
        "model.name=test_vit",
        "data.image_size=160",
        "callbacks/finetune=unfreeze",
        "callbacks.finetune.epoch=0",
        "callbacks.finetune.blocks=2",
    )
    with pytest.raises(ModelConfigError, match="timm model 'test_vit' is used whole") as err:
        train(cfg)
    assert "callbacks.finetune.blocks=all" in str(err.value) and "\n" not in str(err.value)


def test_pretrained_for_a_model_timm_has_no_weights_for_is_one_line():
    with pytest.raises(WeightsError, match="timm has no pretrained weights for") as err:
        build_feature_extractor("timm", True, None, "botnet50ts_256")
    assert "model.pretrained=false" in str(err.value) and "\n" not in str(err.value)
