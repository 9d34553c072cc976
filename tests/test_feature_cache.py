"""Feature caching: same validation figures as the image path, reused, invalidated, lazy."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from crack_lightning.data.feature_cache import apply_view, cache_key
from crack_lightning.errors import ModelConfigError
from crack_lightning.models.network import Activations
from crack_lightning.training.run import build, train


def cache_files(cfg) -> list[Path]:
    return sorted(Path(cfg.data.cache_dir).glob("features_*.pt"))


@pytest.fixture
def cached_cfg(synthetic_cfg, backbone_weights):
    """Real ImageNet MobileNetV2 features on tiny synthetic images."""

    def _make(*overrides: str):
        return synthetic_cfg(
            "model=mobilenetv2",
            f"model.weights_path={backbone_weights}",
            "data.cache_features=true",
            "data.cache_views=4",
            *overrides,
        )

    return _make


def test_views_are_the_distinct_flips_and_rotations():
    image = torch.arange(2 * 3 * 3).reshape(1, 2, 3, 3)
    views = [apply_view(image, v) for v in range(8)]
    assert torch.equal(views[0], image)
    assert torch.equal(views[2], image.flip(-1).flip(-2))  # 180 degrees
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


def test_cached_validation_matches_the_image_path(cached_cfg, synthetic_cfg, backbone_weights):
    cached = cached_cfg("data/augmentation=none", "trainer.max_epochs=2")
    metrics = train(cached)
    # the same best checkpoint, validated on images instead of cached features
    plain = synthetic_cfg("model=mobilenetv2", f"model.weights_path={backbone_weights}")
    datamodule = build(plain.data)
    datamodule.setup("fit")
    model = build(plain.model)
    state = torch.load(metrics["best_checkpoint"], weights_only=True)["state_dict"]
    model.load_state_dict(state)
    model.eval()
    losses, correct, count = [], 0, 0
    with torch.inference_mode():
        for images, labels in datamodule.val_dataloader():
            logits = model(images)
            losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += len(labels)
    assert float(sum(losses) / count) == pytest.approx(metrics["val/loss"], abs=2e-3)
    assert correct / count == pytest.approx(metrics["val/acc"])


@pytest.mark.parametrize("stage", [None, 16])
def test_cached_batches_say_what_they_hold_and_give_the_image_path_features(cached_cfg, stage):
    """Pooled features, or the output of features[:16]: the batch says which, and the
    network finishes it into the features the images give."""
    cfg = cached_cfg("data/augmentation=none")
    images_module = build(cfg.data)
    images_module.setup("fit")
    images, labels = next(iter(images_module.val_dataloader()))
    cached_module = build(cfg.data)
    cached_module.setup("fit")
    model = build(cfg.model).eval()
    cached_module.use_feature_cache(model.net, torch.device("cpu"), stage)
    batch, cached_labels = next(iter(cached_module.val_dataloader()))
    assert isinstance(batch, Activations) and batch.stage == stage
    assert torch.equal(cached_labels, labels)
    assert batch.values.shape == (
        (len(labels), 1280) if stage is None else (len(labels), 160, 2, 2)
    )
    moved = move_data_to_device(batch, torch.device("cpu"))  # as Lightning moves a batch
    assert isinstance(moved, Activations) and moved.stage == stage
    with torch.inference_mode():
        pooled = model.net.pooled(moved)
        torch.testing.assert_close(pooled, model.net.pooled(images), rtol=2e-2, atol=2e-2)
    if stage is None:
        assert pooled is moved.values  # nothing left to run


def test_a_learning_rate_sweep_reuses_the_cache(cached_cfg):
    first = cached_cfg("model.lr=1e-3")
    train(first)
    [path] = cache_files(first)
    stamp = path.stat().st_mtime_ns
    stored = torch.load(path, weights_only=True)
    second = cached_cfg(
        "model.lr=1e-4", f"paths.output_dir={Path(first.paths.output_dir).parent / 'second'}"
    )
    train(second)
    assert cache_files(second) == [path]
    assert path.stat().st_mtime_ns == stamp  # nothing recomputed, nothing rewritten
    assert stored["features"].shape[0] == 4  # four views
    # training images have all four views, validation images only the plain one
    done = stored["done"]
    assert bool(done[0].all()) and 0 < int(done[1:].sum()) < 3 * done.shape[1]


def test_another_split_completes_the_cache_lazily(cached_cfg):
    train(cached_cfg("data.seed=1"))
    [path] = cache_files(cached_cfg())
    before = torch.load(path, weights_only=True)["done"]
    train(cached_cfg("data.seed=2", "overwrite=true"))  # the same run folder, replaced
    after = torch.load(path, weights_only=True)["done"]
    assert bool((after | ~before).all())  # nothing lost
    assert int(after.sum()) > int(before.sum())  # new training images got their other views


def test_changed_weights_image_size_views_or_files_give_a_new_key(synthetic_root, tmp_path):
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    backbone = mobilenet_v3_small()
    files = []
    for source in sorted((synthetic_root / "Positive").iterdir())[:4]:
        files.append(str(tmp_path / source.name))
        shutil.copy(source, files[-1])
    key = cache_key(backbone, files, 64, 8)
    assert cache_key(backbone, files, 64, 8) == key
    assert cache_key(backbone, files, 96, 8) != key
    assert cache_key(backbone, files, 64, 1) != key
    assert cache_key(backbone, files[:3], 64, 8) != key
    with torch.no_grad():
        backbone.features[0][0].weight.mul_(1.001)
    changed = cache_key(backbone, files, 64, 8)
    assert changed != key
    stat = os.stat(files[0])
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache_key(backbone, files, 64, 8) != changed


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.freeze_backbone=false"],
        ["callbacks/finetune=unfreeze", "callbacks.finetune.epoch=1"],
    ],
)
def test_caching_a_backbone_that_trains_is_refused(cached_cfg, overrides):
    with pytest.raises(ModelConfigError, match="needs a backbone that stays frozen"):
        train(cached_cfg(*overrides))


@pytest.fixture
def small_cache(synthetic_root, tmp_path):
    """A 2-view cache of 16 synthetic images and what fill needs, random-init backbone."""
    from crack_lightning.data.feature_cache import FeatureCache
    from crack_lightning.models.classifier import CrackClassifier

    torch.manual_seed(0)
    model = CrackClassifier(
        backbone="mobilenet_v3_small",
        pretrained=False,
        weights_path=None,
        freeze_backbone=True,
        channels_last=False,
        dropout=0.0,
        lr=1e-3,
        weight_decay=0.0,
        scheduler=None,
        image_size=32,
    )
    files = [str(p) for p in sorted(synthetic_root.rglob("*.jpg"))[:16]]
    path = tmp_path / "features_test.pt"
    dim = model.net.head[-1].in_features

    def make() -> FeatureCache:
        return FeatureCache(path, len(files), 2, (dim,))

    def fill(cache: FeatureCache, num_workers: int = 0) -> None:
        needed = torch.ones(2, len(files), dtype=torch.bool)
        cache.fill(
            model.net.eval().features,
            files,
            needed,
            32,
            4,
            num_workers,
            torch.device("cpu"),
            "stop",
        )

    return make, fill, model.net, path


def test_two_runs_saving_the_cache_at_once_both_succeed(small_cache, monkeypatch):
    make, _, _, path = small_cache
    first, second = make(), make()
    first.done[:, :8] = True
    second.done[:, 8:] = True
    second.features[:, 8:] = 1.0
    original = torch.save
    overlapped = []

    def save_while_the_other_saves(obj, target, *args, **kwargs):
        original(obj, target, *args, **kwargs)
        if not overlapped:  # the second run saves completely in the middle of the first's save
            overlapped.append(True)
            second.save()

    monkeypatch.setattr(torch, "save", save_while_the_other_saves)
    first.save()  # a shared temp name would be renamed away: FileNotFoundError
    assert overlapped
    assert not list(path.parent.glob("*.partial"))
    assert bool(make().done[:, :8].all())  # a whole file: the last writer's
    second.save()  # its next save merges what the other run saved meanwhile
    merged = make()
    assert bool(merged.done.all())
    assert bool((merged.features[:, 8:] == 1.0).all())


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_damaged_cache_file_is_named_and_computed_again(small_cache, caplog, damage):
    make, fill, _, path = small_cache
    fill(make())
    good = torch.load(path, weights_only=True)["features"]
    data = path.read_bytes()
    path.write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"x" * 1000}[damage]
    )
    with caplog.at_level("WARNING"):
        cache = make()  # a warning, not a RuntimeError from PytorchStreamReader
    assert str(path) in caplog.text and "damaged" in caplog.text
    assert not bool(cache.done.any())
    fill(cache)
    again = torch.load(path, weights_only=True)
    assert bool(again["done"].all())
    assert torch.allclose(again["features"].float(), good.float(), atol=1e-2)


def test_a_killed_fill_resumes_from_its_last_save(small_cache, monkeypatch):
    import crack_lightning.data.feature_cache as feature_cache

    make, fill, net, path = small_cache
    monkeypatch.setattr(feature_cache, "SAVE_EVERY_S", 0.0)  # save after every batch
    calls = []
    original = net.features

    def dies_in_the_third_batch(images):
        calls.append(len(images))
        if len(calls) == 5:  # two views per batch: the 3rd batch's first view
            raise KeyboardInterrupt
        return original(images)

    monkeypatch.setattr(net, "features", dies_in_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        fill(make())
    saved = torch.load(path, weights_only=True)["done"]  # the progress saved before the interrupt
    assert int(saved.sum()) == 2 * 8  # two batches of 4 images, two views each
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    calls.clear()
    monkeypatch.setattr(
        net, "features", lambda images: calls.append(len(images)) or original(images)
    )
    fill(make())
    assert sum(calls) == 2 * 8  # only the other 8 images computed
    assert bool(torch.load(path, weights_only=True)["done"].all())


@pytest.mark.parametrize(
    ("setting", "frozen", "finetuning", "quick", "expected"),
    [
        ("auto", True, False, False, True),  # the default command caches
        ("auto", False, False, False, False),  # a backbone that trains: images
        ("auto", True, True, False, False),  # fine-tuning later: images
        ("auto", True, False, True, False),  # fast_dev_run: no whole-pass fill
        (False, True, False, False, False),  # images every epoch, on request
        (True, True, False, True, True),
    ],
)
def test_auto_caches_whenever_the_backbone_stays_frozen(
    setting, frozen, finetuning, quick, expected
):
    from crack_lightning.data.feature_cache import cache_wanted

    assert cache_wanted(setting, frozen, finetuning, quick) is expected


def test_the_default_config_caches_one_view(cached_cfg, make_cfg):
    cfg = make_cfg()
    assert cfg.data.cache_features == "auto" and cfg.data.cache_views == 1


def test_ctrl_c_during_a_fill_keeps_what_was_computed(small_cache, monkeypatch):
    make, fill, net, path = small_cache
    calls = []
    original = net.features

    def interrupted_in_the_second_batch(images):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(images)

    monkeypatch.setattr(net, "features", interrupted_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        fill(make())  # SAVE_EVERY_S (60 s) has not passed: saved on the way out
    assert int(torch.load(path, weights_only=True)["done"].sum()) == 2 * 4


def test_a_fill_in_worker_processes_stores_what_the_main_process_computes(
    small_cache, monkeypatch, caplog
):
    make, fill, net, path = small_cache
    fill(make())  # num_workers=0: decoding and the backbone in this process
    alone = torch.load(path, weights_only=True)["features"]
    path.unlink()
    calls = []
    original = net.features
    monkeypatch.setattr(
        net, "features", lambda images: calls.append(len(images)) or original(images)
    )
    with caplog.at_level("INFO"):
        fill(make(), num_workers=2)
    assert calls == [1]  # here only the probe that folds the backbone: the batches ran in workers
    stored = torch.load(path, weights_only=True)
    assert bool(stored["done"].all())
    assert torch.equal(stored["features"], alone)  # the same batches, the same values
    line = next(r.getMessage() for r in caplog.records if "Feature cache filled" in r.getMessage())
    assert line.startswith("Feature cache filled: 32 image views")  # 16 images x 2 views
    assert "forward pass alone" in line


def test_a_damaged_image_in_a_fill_in_workers_is_named_and_leaves_no_stray_workers(
    small_cache, sample_root, tmp_path, capfd
):
    from crack_lightning.data.feature_cache import FeatureCache
    from crack_lightning.errors import DamagedImage

    _, _, net, _ = small_cache
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    files = [str(p) for p in sorted(sample_root.rglob("*.jpg"))[:6]]
    files.insert(3, str(tmp_path / "bad.jpg"))
    needed = torch.ones(1, len(files), dtype=torch.bool)
    dim = net.head[-1].in_features

    def fill(on_bad: str) -> FeatureCache:
        cache = FeatureCache(tmp_path / f"{on_bad}.pt", len(files), 1, (dim,))
        cache.fill(net.eval().features, files, needed, 32, 2, 2, torch.device("cpu"), on_bad)
        return cache

    with pytest.raises(DamagedImage, match=r"bad\.jpg: not an image.*on_bad_image=skip"):
        fill("stop")
    # its workers are gone: not left to the garbage collector of the next processes forked
    assert multiprocessing.active_children() == []
    assert fill("skip").done.tolist() == [[True] * 3 + [False] + [True] * 3]
    assert "can only test a child process" not in capfd.readouterr().err
