"""One decode path: training, the feature cache and prediction see the same pixels for a
file; damaged files are named, skipped or stop the run, and flagged by the full check."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from crack_lightning.data.check import check_dataset
from crack_lightning.data.decode import DecodedImages, jpeg_problem, load_rgb
from crack_lightning.errors import DamagedImage, UnreadableImage
from crack_lightning.inference.classifiers import ImageFiles
from crack_lightning.io import load_error_reason
from crack_lightning.training.run import build, train

from .damaged import grey16, plant_damaged, random_bytes_mid_scan
from .probes import validate_by_hand

SIZE = 64


def crack_images(sample_root: Path, count: int) -> list[Image.Image]:
    files = sorted((sample_root / "Positive").glob("*.jpg"))[:count]
    return [Image.open(path).convert("RGB") for path in files]


def save_awkward(image: Image.Image, folder: Path, stem: str) -> list[Path]:
    """The image as an EXIF-rotated JPEG, a half-transparent PNG and a 16-bit PNG."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    image.transpose(Image.Transpose.ROTATE_90).save(folder / f"{stem}_exif.jpg", exif=exif)
    rgba = image.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / f"{stem}_rgba.png")
    grey16(image).save(folder / f"{stem}_grey16.png")
    return [folder / f"{stem}_{kind}" for kind in ("exif.jpg", "rgba.png", "grey16.png")]


def loader_images(datamodule, split: str) -> dict[str, torch.Tensor]:
    """What the training loader of `split` yields for each of its files (it is unshuffled)."""
    paths = [path for path, _ in datamodule.split_samples(split)]
    loader = getattr(datamodule, f"{split}_dataloader")()
    images = torch.cat([batch for batch, _ in loader])
    return dict(zip(paths, images, strict=True))


def test_training_and_prediction_decode_awkward_files_alike(make_cfg, sample_root, tmp_path):
    root = tmp_path / "data"
    (root / "Positive").mkdir(parents=True)
    (root / "Negative").mkdir(parents=True)
    awkward = []
    for i, image in enumerate(crack_images(sample_root, 4)):
        awkward += save_awkward(image, root / "Positive", f"crack{i}")
    for path in sorted((sample_root / "Negative").glob("*.jpg"))[:12]:
        shutil.copy(path, root / "Negative")
    datamodule = build(
        make_cfg(f"data.root={root}", f"data.image_size={SIZE}", "data.val_fraction=0.5").data
    )
    datamodule.setup("fit")
    seen = loader_images(datamodule, "val")
    kinds = {Path(path).stem.split("_")[1] for path in seen if path in map(str, awkward)}
    assert kinds == {"exif", "rgba", "grey16"}  # every kind is compared below
    predicted = ImageFiles([Path(p) for p in seen], SIZE)
    for i, (path, image) in enumerate(seen.items()):
        assert torch.equal(image, predicted[i][0]), path
    # and all three show the same crack, upright, over white, not clipped to white
    originals = crack_images(sample_root, 1)[0]
    reference = np.asarray(originals, dtype=np.float32)
    for path in awkward[:3]:
        pixels = np.asarray(load_rgb(path), dtype=np.float32)
        if "rgba" in path.name:  # half-transparent over white
            pixels = (pixels - 127.5) * 2
        grey = reference.mean(axis=-1, keepdims=True) if "grey16" in path.name else reference
        assert np.abs(pixels - grey).mean() < 8, path


def test_sixteen_bit_pngs_do_not_train_as_blank(make_cfg, sample_root, tmp_path):
    root = tmp_path / "data"
    for label, files in (
        ("Positive", sorted((sample_root / "Positive").glob("*.jpg"))[:10]),
        ("Negative", sorted((sample_root / "Negative").glob("*.jpg"))[:10]),
    ):
        (root / label).mkdir(parents=True)
        for path in files:
            grey16(Image.open(path)).save(root / label / f"{path.stem}.png")
    datamodule = build(make_cfg(f"data.root={root}", f"data.image_size={SIZE}").data)
    datamodule.setup("fit")
    images = torch.cat([batch for batch, _ in datamodule.train_dataloader()]).float()
    assert len(images) == 14
    assert (images == 255).float().mean() < 0.05  # pixels are not clipped to 255
    assert images.std() > 10  # there is a picture: cracks on concrete, not a blank page


@pytest.fixture
def damaged(sample_root, tmp_path) -> dict[str, Path]:
    return plant_damaged(tmp_path / "damaged", sorted((sample_root / "Negative").glob("*.jpg"))[0])


def test_damaged_files_are_unreadable_with_a_reason(damaged):
    for key in ("random_bytes", "flipped_idat"):
        with pytest.raises(UnreadableImage, match="corrupt or truncated"):
            load_rgb(damaged[key])


def test_a_missing_or_unreadable_file_is_not_called_corrupt(tmp_path):
    with pytest.raises(UnreadableImage, match=r"^does not exist$"):
        load_rgb(tmp_path / "missing.jpg")
    link = tmp_path / "link.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(UnreadableImage, match=f"^a broken link: its target {tmp_path}/gone.jpg"):
        load_rgb(link)
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(UnreadableImage, match=r"^cannot be read: Is a directory$"):
        load_rgb(tmp_path / "folder.jpg")
    # torch.load's failures to open a file are not the file's bytes either
    assert load_error_reason(PermissionError(13, "Permission denied")) == (
        "cannot be read (Permission denied)."
    )


def test_a_corrupt_jpeg_scan_is_refused_even_where_pillow_decodes_garbage(sample_root):
    jpeg = sorted((sample_root / "Negative").glob("*.jpg"))[0].read_bytes()
    assert jpeg_problem(jpeg) is None
    assert jpeg_problem(random_bytes_mid_scan(jpeg, seed=9)) == (
        "corrupt JPEG data (restart marker out of order at byte 3199)"
    )
    every = [p for p in sample_root.rglob("*.jpg") if jpeg_problem(p.read_bytes())]
    assert every == []  # no false alarm on the 481 real images


def test_full_check_flags_damaged_and_uniform_images(synthetic_root, damaged, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    for path in damaged.values():
        shutil.copy(path, root / "Negative")
    report = check_dataset(root, progress=False)
    flagged = {line.split(":")[0]: line for line in report.errors}
    assert sorted(flagged) == [
        "Negative/flipped_idat.png",
        "Negative/random_bytes.jpg",
        "Negative/zeroed_scan.jpg",
    ]
    assert "suspiciously uniform" in flagged["Negative/zeroed_scan.jpg"]
    assert "cannot be decoded" in flagged["Negative/random_bytes.jpg"]
    assert not report.ok


def damaged_cfg(synthetic_cfg, synthetic_root, damaged, tmp_path, *overrides: str):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    for key in ("random_bytes", "flipped_idat"):
        shutil.copy(damaged[key], root / "Negative")
    return synthetic_cfg(f"data.root={root}", "logger=none", *overrides)


@pytest.mark.parametrize("cached", ["true", "false"])  # the feature cache and the image path
def test_training_skips_damaged_images_and_lists_them(
    synthetic_cfg, synthetic_root, damaged, tmp_path, caplog, cached
):
    cfg = damaged_cfg(
        synthetic_cfg,
        synthetic_root,
        damaged,
        tmp_path,
        "data.on_bad_image=skip",
        f"data.cache_features={cached}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    with caplog.at_level(logging.WARNING):
        metrics = train(cfg)
    # the figures are the best weights' over the validation images that decode (a cache
    # of its own: refilling the run's, whose only missing rows are the damaged images,
    # stops with "none of the 2 images can be read")
    best = torch.load(metrics["best_checkpoint"], weights_only=True)["state_dict"]
    cfg.paths.cache_dir = str(tmp_path / "hand_cache")
    expected = validate_by_hand(cfg, best)
    assert metrics["val/loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert metrics["val/acc"] == pytest.approx(expected["acc"])
    listed = [r.getMessage() for r in caplog.records if "damaged image(s) skipped" in r.message]
    assert len(listed) == 1
    assert listed[0].startswith("2 damaged image(s) skipped")
    assert "random_bytes.jpg" in listed[0] and "flipped_idat.png" in listed[0]


def test_training_stops_at_a_damaged_image_naming_it(
    synthetic_cfg, synthetic_root, damaged, tmp_path
):
    cfg = damaged_cfg(synthetic_cfg, synthetic_root, damaged, tmp_path, "data.on_bad_image=stop")
    with pytest.raises(DamagedImage, match=r"(random_bytes\.jpg|flipped_idat\.png): corrupt"):
        train(cfg)


def test_a_damaged_image_in_a_worker_process_gives_one_line(damaged):
    images = DecodedImages([damaged["flipped_idat"]], [0], SIZE, on_bad="stop")
    with pytest.raises(DamagedImage) as caught:
        next(iter(DataLoader(images, num_workers=1)))
    assert str(caught.value) == (
        f"{damaged['flipped_idat']}: corrupt or truncated image (broken data stream when "
        f"reading image file). Delete or replace the file, or set data.on_bad_image=skip "
        f"to train without it."
    )
