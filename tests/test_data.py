"""Data layout checks, stratified seeded splits, transforms and batches."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.data.sources import scan_samples
from crack_lightning.data.splits import stratified_split
from crack_lightning.data.transforms import Augmentation, augment_batch
from crack_lightning.errors import DataError
from crack_lightning.training.check import check_train_settings
from crack_lightning.training.run import build

from .conftest import ROOT


def make_images(folder: Path, count: int, colour: int = 128) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40, 40), (colour, colour, colour)).save(folder / f"{i:03d}.png")


def datamodule(cfg) -> CrackDataModule:
    dm = build(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# --- layout -----------------------------------------------------------------------------


def test_missing_root_says_where_to_get_the_data(tmp_path):
    with pytest.raises(DataError, match=r"data.root=.*nowhere does not exist.*doi:10.17632"):
        scan_samples(tmp_path / "nowhere")


def test_wrong_layout_names_the_path_and_what_was_found(tmp_path):
    make_images(tmp_path / "cracked", 2)
    make_images(tmp_path / "clean", 2)
    with pytest.raises(DataError) as info:
        scan_samples(tmp_path)
    message = str(info.value)
    assert f"data.root={tmp_path}" in message
    assert "Negative/ and Positive/" in message and "found clean/, cracked/" in message


def test_class_folders_one_level_down_suggest_the_right_root(tmp_path):
    inner = tmp_path / "Concrete Crack Images for Classification"
    make_images(inner / "Positive", 1)
    make_images(inner / "Negative", 1)
    with pytest.raises(DataError, match=f"set data.root={inner}"):
        scan_samples(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    make_images(tmp_path / "Negative", 3)
    (tmp_path / "Positive").mkdir()
    (tmp_path / "Positive" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"Class folder {tmp_path / 'Positive'} holds no images"):
        scan_samples(tmp_path)


def test_class_folders_match_in_any_case_with_fixed_labels(tmp_path):
    make_images(tmp_path / "POSITIVE", 2)
    make_images(tmp_path / "negative", 3)
    labels = Counter((Path(path).parent.name, label) for path, label in scan_samples(tmp_path))
    assert labels == {("negative", 0): 3, ("POSITIVE", 1): 2}


# --- splits -----------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["random", "grouped"])
def test_data_root_is_one_source_with_the_same_split_and_manifest(
    make_cfg, sample_root, tmp_path, split
):
    """data.root=DIR and a one-entry data.sources naming DIR's class folders go through
    the same code: the same files in the same splits, the same manifest, byte for byte."""
    folder = [
        "+data/sources@data.sources.root=folder",
        f"data.sources.root.root={sample_root}",
        f"data.sources.root.split={split}",
    ]
    manifests = {}
    for name, overrides in (
        ("root", [f"data.root={sample_root}", f"data.split={split}"]),
        ("sources", [f"data.root={tmp_path / 'unused'}", *folder]),
    ):
        dm = datamodule(make_cfg(*overrides, "data.test_fraction=0.1"))
        manifests[name] = tmp_path / f"{name}.csv"
        dm.write_manifest(manifests[name])
        assert dm.split_sources("val") == ([], [0] * len(dm.split["val"]))
    rows = read_manifest(manifests["root"])
    assert len(rows) == 481 and {row["source"] for row in rows} == {"root"}
    assert Counter(row["split"] for row in rows)["test"] >= 46
    assert manifests["root"].read_bytes() == manifests["sources"].read_bytes()


@pytest.mark.parametrize("value", ["maybe", "[1,2]"])
def test_balanced_sampling_must_be_true_or_false(make_cfg, value):
    with pytest.raises(DataError, match=r"^data\.balanced_sampling=.* must be true or false\.$"):
        check_train_settings(make_cfg(f"data.balanced_sampling={value}"))


def test_same_seed_gives_the_same_manifest_and_another_seed_a_different_one(
    make_cfg, sample_root, tmp_path
):
    paths = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        dm = datamodule(make_cfg(f"data.root={sample_root}", f"data.seed={seed}"))
        paths[name] = tmp_path / f"{name}.csv"
        dm.write_manifest(paths[name])
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    assert paths["a"].read_bytes() != paths["c"].read_bytes()


def test_split_is_stratified_disjoint_and_complete_on_the_real_sample(make_cfg, sample_root):
    dm = datamodule(make_cfg(f"data.root={sample_root}"))
    rows = {name: dm.split_samples(name) for name in ("train", "val", "test")}
    files = [path for samples in rows.values() for path, _ in samples]
    assert len(files) == len(set(files)) == 481  # every image once, none in two splits
    assert rows["test"] == []
    assert len(rows["val"]) == round(241 * 0.3) + round(240 * 0.3) == 144
    for name in ("train", "val"):
        positives = sum(label for _, label in rows[name])
        # the whole sample's ratio, within one image
        assert abs(positives - len(rows[name]) * 241 / 481) < 1, name


def test_test_fraction_is_carved_from_the_same_pool(make_cfg, sample_root, tmp_path):
    dm = datamodule(
        make_cfg(f"data.root={sample_root}", "data.val_fraction=0.2", "data.test_fraction=0.1")
    )
    dm.write_manifest(tmp_path / "manifest.csv")
    rows = read_manifest(tmp_path / "manifest.csv")
    counts = Counter((row["split"], row["label"]) for row in rows)
    assert counts == {
        ("train", "Positive"): 169,
        ("val", "Positive"): 48,
        ("test", "Positive"): 24,
        ("train", "Negative"): 168,
        ("val", "Negative"): 48,
        ("test", "Negative"): 24,
    }
    assert len({row["path"] for row in rows}) == 481
    assert (
        rows[0]["path"]
        == "Negative/" + sorted(p.name for p in (sample_root / "Negative").iterdir())[0]
    )


@pytest.mark.parametrize(
    ("val", "test", "message"),
    [
        (0.0, 0.0, "data.val_fraction=0.0 must lie strictly between 0 and 1"),
        (0.6, 0.5, "leaves no images to train on"),
        (0.3, -0.1, "data.test_fraction=-0.1 must lie in"),
    ],
)
def test_impossible_fractions_are_refused(val, test, message):
    with pytest.raises(DataError, match=message):
        stratified_split([0, 1] * 50, val, test, seed=0)


def test_too_few_images_for_a_split_is_a_clear_error():
    with pytest.raises(DataError, match="Class Positive has only 1 images"):
        stratified_split([0, 0, 0, 0, 1], 0.3, 0.0, seed=0)


# --- transforms and batches ---------------------------------------------------------------


def augmentation(**changes) -> Augmentation:
    """conf/data/augmentation/none.yaml (every setting off) with `changes`."""
    none = OmegaConf.load(ROOT / "conf" / "data" / "augmentation" / "none.yaml")
    return Augmentation.from_config({**none, **changes})


def test_rotation_fills_corners_by_reflection_not_black():
    flat = torch.full((6, 3, 96, 96), 180, dtype=torch.uint8)
    flat[:, 1] = 170
    rotate = augmentation(rotation_degrees=45)
    torch.manual_seed(0)
    out = augment_batch(flat, rotate)
    assert out.dtype == torch.float32 and out.shape == (6, 3, 96, 96)
    assert torch.allclose(out[:, 0], torch.tensor(180 / 255))  # black corners would be 0
    assert torch.allclose(out[:, 1], torch.tensor(170 / 255))


def test_rotation_turns_each_image_by_its_own_angle_within_the_limit():
    """A vertical bar, rotated: its tilt varies per image and stays within the limit."""
    bar = torch.zeros(64, 3, 65, 65, dtype=torch.uint8)
    bar[:, :, :, 31:34] = 255
    torch.manual_seed(0)
    out = augment_batch(bar, augmentation(rotation_degrees=20))
    rows = torch.arange(65, dtype=torch.float32)
    weights = out[:, 0]  # (N, H, W)
    centre = (weights * torch.arange(65.0)).sum(-1) / weights.sum(-1)  # bar centre per row
    slope = ((rows - 32) * (centre - centre.mean(-1, keepdim=True))).sum(-1) / (
        (rows - 32) ** 2
    ).sum()
    angles = torch.rad2deg(torch.atan(slope)).abs()
    assert angles.max() <= 20.5 and angles.max() > 15  # spread over the range
    assert angles.min() < 5


def test_flips_are_exact_mirror_images():
    images = torch.randint(0, 256, (32, 3, 24, 24), dtype=torch.uint8)
    torch.manual_seed(0)
    out = (augment_batch(images, augmentation(horizontal_flip=True)) * 255).round().to(torch.uint8)
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    same = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(m != s for m, s in zip(mirrored, same, strict=True))  # one or the other
    assert 8 <= sum(mirrored) <= 24  # about half


def test_training_batches_alone_are_augmented_on_their_device(make_cfg, sample_root):
    cfg = make_cfg(f"data.root={sample_root}", "data.image_size=64", "data.batch_size=8")
    dm = datamodule(cfg)
    images, labels = next(iter(dm.val_dataloader()))
    trainer = SimpleNamespace(training=False)
    dm.trainer = trainer
    assert dm.on_after_batch_transfer((images, labels), 0)[0] is images  # validation
    trainer.training = True
    augmented, same_labels = dm.on_after_batch_transfer((images, labels), 0)
    assert same_labels is labels and augmented.shape == images.shape
    assert augmented.dtype == torch.float32 and not torch.allclose(augmented, images / 255)
    dm.features = torch.zeros(1, 481, 1280)  # served from the feature cache:
    for features in (torch.zeros(8, 1280), torch.rand(8, 160, 7, 7)):  # pooled, a stage's
        assert dm.on_after_batch_transfer((features, labels), 0)[0] is features
    off = datamodule(make_cfg(f"data.root={sample_root}", "data/augmentation=none"))
    off.trainer = trainer
    assert off.on_after_batch_transfer((images, labels), 0)[0] is images


def test_unknown_augmentation_setting_is_refused():
    with pytest.raises(DataError, match="data.augmentation: Augmentation takes no setting"):
        Augmentation.from_config({"horizontal_flip": True, "vertical_flip": True, "zoom": 0.1})


def test_batches_are_uint8_images_with_labels(make_cfg, sample_root):
    dm = datamodule(make_cfg(f"data.root={sample_root}", "data.image_size=96", "data.batch_size=8"))
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 96, 96)
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape == (8, 3, 96, 96)


def photometric(**settings) -> Augmentation:
    """Only the named photometric settings on (no flips, rotation or crop)."""
    return augmentation(**settings)


def test_photometric_settings_each_do_what_they_say():
    torch.manual_seed(0)
    images = torch.rand(16, 3, 32, 32) * 0.4 + 0.2  # brightness x1.5 stays below 1
    grey = augment_batch(images, photometric(grayscale_p=1.0))
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    # brightness scales each image by one factor within [0.5, 1.5]
    ratio = augment_batch(images, photometric(brightness=0.5)) / images
    per_image = ratio.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1], atol=1e-5)
    assert per_image[:, 0].min() >= 0.5 - 1e-5 and per_image[:, 0].max() <= 1.5 + 1e-5
    assert per_image[:, 0].std() > 0.1  # a factor per image, not one per batch
    # blur always on: fine detail (pixel-to-pixel differences) goes down in every image
    blurred = augment_batch(images, photometric(blur_p=1.0, blur_sigma=2.0))
    detail = lambda x: x.diff(dim=-1).abs().mean(dim=(1, 2, 3))  # noqa: E731
    assert (detail(blurred) < detail(images)).all()
    # noise changes pixels by about its spread, and never leaves [0, 1]
    noisy = augment_batch(images, photometric(noise_std=0.1))
    assert 0.005 < (noisy - images).abs().mean() < 0.1 and noisy.min() >= 0 and noisy.max() <= 1
    # JPEG at a low quality: changed, but still the same picture
    jpeg = augment_batch(images, photometric(jpeg_p=1.0, jpeg_quality_min=10))
    assert 0.005 < (jpeg - images).abs().mean() < 0.2


def test_scale_crops_a_part_of_the_image_and_fills_the_frame():
    """On a left-to-right ramp from 0 to 1, a crop of area share a (side sqrt(a)) shows
    values spanning about sqrt(a): with scale_min=0.25, spans between 0.5 and 1, each
    crop its own size."""
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 64).expand(32, 3, 64, 64)
    crops = augment_batch(ramp, photometric(scale_min=0.25))
    middle_row = crops[:, 0, 32]
    spans = middle_row.max(dim=1).values - middle_row.min(dim=1).values
    assert spans.min() > 0.5 - 0.05 and spans.max() <= 1.0
    assert spans.min() < 0.7 and spans.std() > 0.05
    # the crop fills the frame: values rise along the row (no reflected border)
    assert (middle_row.diff(dim=1) >= -1e-4).all()


@pytest.mark.parametrize(
    "setting, value", [("blur_p", 1.5), ("scale_min", 0.0), ("jpeg_quality_min", 0)]
)
def test_out_of_range_augmentation_settings_are_named(make_cfg, setting, value):
    cfg = make_cfg("data/augmentation=photometric", f"data.augmentation.{setting}={value}")
    with pytest.raises(DataError, match=rf"data.augmentation.{setting}={value} must be in"):
        Augmentation.from_config(cfg.data.augmentation)


def test_augmentation_configs_turn_on_what_their_names_say(make_cfg):
    def built(name: str) -> Augmentation:
        return Augmentation.from_config(make_cfg(f"data/augmentation={name}").data.augmentation)

    assert not built("none").enabled
    flip_rotate = built("flip_rotate")
    assert flip_rotate.enabled and not flip_rotate.photometric
    photo = built("photometric")
    assert photo.photometric and photo.rotation_degrees == flip_rotate.rotation_degrees
