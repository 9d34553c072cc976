"""Photos with crack masks as a data source (data/masks.py, `data/sources=masks`): tiles and
their labels from hand-made masks, tiles of one photo on one side of every split, tiles
decoded and cached like files, a real training run, `crack-data check`, and each bad
input named in one line."""

from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from crack_lightning.data.decode import decode, load_rgb, resize, sample_file, split_tile
from crack_lightning.data.feature_cache import cache_key, cached_features
from crack_lightning.data.masks import tile_source
from crack_lightning.data.sources import SourceSpec
from crack_lightning.data.splits import load_sources
from crack_lightning.errors import DataError

from .conftest import QUIET, SHARED, SMALL, compose_config, shared_path

CRACKTILE = SHARED / "data" / "masked" / "cracktile"
# the module (crack_lightning.data exports its function `decode` under the same name)
decoding = importlib.import_module("crack_lightning.data.decode")


def settings(root: Path, *overrides: str, name: str = "tiles") -> dict:
    """data.sources.NAME as the shipped masks.yaml composes it, with overrides."""
    cfg = compose_config(
        "train",
        [
            f"+data/sources@data.sources.{name}=masks",
            f"data.sources.{name}.root={root}",
            *(f"data.sources.{name}.{item}" for item in overrides),
        ],
    )
    return OmegaConf.to_container(cfg.data.sources, resolve=True)


def spec(root: Path, *overrides: str) -> SourceSpec:
    return SourceSpec.from_config("tiles", settings(root, *overrides)["tiles"])


def write_photo(folder: Path, name: str, width: int, height: int, seed: int = 0) -> Path:
    """A noisy RGB photo (PNG: lossless, so crops compare exactly)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path = folder / name
    Image.fromarray(pixels).save(path)
    return path


def write_mask(path: Path, levels: np.ndarray) -> Path:
    Image.fromarray(levels.astype(np.uint8), mode="L").save(path)
    return path


def labelled(samples: list[tuple[str, int]]) -> dict[tuple[int, int], int]:
    """(x, y) of each tile -> its label."""
    return {split_tile(path)[1][:2]: label for path, label in samples}


def test_tiles_and_their_labels_from_a_hand_made_mask(tmp_path):
    """A 32x16 photo in 8 px tiles: 4 x 2 tiles, each with a known crack share."""
    photo = write_photo(tmp_path, "wall.png", 32, 16)
    levels = np.zeros((16, 32), dtype=np.uint8)
    levels[0:8, 0:8] = 255  # tile (0, 0): all crack
    levels[0, 8:12] = 255  # tile (8, 0): 4 of 64 pixels, 6%
    levels[0, 16] = 255  # tile (16, 0): 1 of 64 pixels, 1.6%
    levels[8:16, 24:32] = 255  # tile (24, 8): all crack
    write_mask(tmp_path / "wall_mask.png", levels)

    samples = tile_source(
        spec(tmp_path, "tile_size=8", "stride=8", "min_share=0.05", "ambiguous=null")
    )
    assert [path for path, _ in samples][:2] == [f"{photo}#0,0,8", f"{photo}#0,8,8"]
    assert {sample_file(path) for path, _ in samples} == {str(photo)}
    assert labelled(samples) == {
        (0, 0): 1, (8, 0): 1, (16, 0): 0, (24, 0): 0,
        (0, 8): 0, (8, 8): 0, (16, 8): 0, (24, 8): 1,
    }  # fmt: skip

    # the ambiguous band leaves out tiles whose share lies strictly inside it
    banded = labelled(
        tile_source(
            spec(tmp_path, "tile_size=8", "stride=8", "min_share=0.05", "ambiguous=[0.0,0.05]")
        )
    )
    assert (16, 0) not in banded and banded[(8, 0)] == 1 and banded[(24, 0)] == 0
    assert len(banded) == 7

    # windows: every stride, the last flush with the edge (32 = 0, 12, 24 at stride 12)
    shifted = labelled(tile_source(spec(tmp_path, "tile_size=8", "stride=12", "ambiguous=null")))
    assert sorted({x for x, _ in shifted}) == [0, 12, 24] and sorted({y for _, y in shifted}) == [
        0,
        8,
    ]


def test_an_empty_mask_gives_only_not_crack_tiles(tmp_path):
    write_photo(tmp_path, "clean.png", 24, 24)
    write_mask(tmp_path / "clean_mask.png", np.zeros((24, 24)))
    samples = tile_source(spec(tmp_path, "tile_size=8", "stride=4"))
    assert len(samples) == 25 and {label for _, label in samples} == {0}


def test_mask_values_map_grey_levels_to_crack_not_crack_or_ignore(tmp_path):
    write_photo(tmp_path, "p.png", 32, 8)
    levels = np.zeros((8, 32), dtype=np.uint8)
    levels[:, 0:8] = 128  # tile 0: all "ignore" -> left out
    levels[:4, 8:16] = 200  # tile 1: half 200 -> mapped to not crack (white otherwise)
    levels[:, 16:24] = 255  # tile 2: crack
    levels[0, 24] = 128  # tile 3: one ignore pixel in a clean tile -> left out
    levels[4:, 24:32] = 255  # ... though half crack: a cracked tile stays crack
    write_mask(tmp_path / "p_mask.png", levels)
    common = ("tile_size=8", "stride=8", "ambiguous=null")

    plain = labelled(tile_source(spec(tmp_path, *common)))
    assert plain == {(0, 0): 1, (8, 0): 1, (16, 0): 1, (24, 0): 1}  # > 127 is crack
    mapped = labelled(
        tile_source(spec(tmp_path, *common, "mask_values={128:ignore,200:not_crack}"))
    )
    assert mapped == {(8, 0): 0, (16, 0): 1, (24, 0): 1}
    levels[4:, 24:32] = 0  # tile 3 now clean but for its ignore pixel
    write_mask(tmp_path / "p_mask.png", levels)
    mapped = labelled(tile_source(spec(tmp_path, *common, "mask_values={128:ignore}")))
    assert mapped == {(8, 0): 1, (16, 0): 1}


def test_masks_in_a_mask_folder(tmp_path):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    write_photo(photos / "a", "p.png", 16, 16)
    (masks / "a").mkdir(parents=True)
    write_mask(masks / "a" / "p.gt.png", np.full((16, 16), 255))
    samples = tile_source(
        spec(photos, f"mask_dir={masks}", "mask_suffix=.gt.png", "tile_size=8", "stride=8")
    )
    assert len(samples) == 4 and {label for _, label in samples} == {1}
    with pytest.raises(DataError, match=r"data.sources.tiles.mask_dir=\S+ is not a folder"):
        tile_source(spec(photos, f"mask_dir={tmp_path / 'elsewhere'}"))


def test_a_tile_decodes_as_its_crop_of_the_photo_once_per_photo(tmp_path):
    photo = write_photo(tmp_path, "p.png", 40, 30)
    whole = load_rgb(photo)
    expected = resize(whole.crop((12, 6, 36, 30)), 16)
    decoding._photo.cache_clear()
    assert torch.equal(decode(f"{photo}#12,6,24", 16), expected)
    assert torch.equal(decode(f"{photo}#0,0,24", 16), resize(whole.crop((0, 0, 24, 24)), 16))
    assert decoding._photo.cache_info().misses == 1  # consecutive tiles: one decode
    os.utime(photo, ns=(0, os.stat(photo).st_mtime_ns + 1_000_000))
    decode(f"{photo}#0,0,24", 16)
    assert decoding._photo.cache_info().misses == 2  # a changed file is decoded again
    # a file whose name merely holds '#' is a file
    odd = write_photo(tmp_path, "a#1.png", 8, 8)
    assert split_tile(odd) == (str(odd), None) and decode(odd, 8).shape == (3, 8, 8)
    from crack_lightning.errors import UnreadableImage

    with pytest.raises(UnreadableImage, match="reaches outside the 40x30 photo"):
        decode(f"{photo}#20,10,24", 16)


def copy_cracktile(target: Path, count: int) -> Path:
    """The first `count` photos of ../shared's cracktile with their masks."""
    source = shared_path(CRACKTILE)
    target.mkdir(parents=True)
    for photo in sorted(source.glob("tile_*.png"))[: 2 * count]:
        shutil.copy(photo, target / photo.name)
    return target


def test_tiles_of_one_photo_stay_on_one_side_of_every_split(tmp_path):
    root = copy_cracktile(tmp_path / "ct", 12)
    specs = [spec(root, "tile_size=64", "stride=48")]
    for seed in range(4):
        data = load_sources(specs, 0.25, 0.2, seed, check=True)
        where = defaultdict(set)
        for name, indices in data.split.items():
            for i in indices:
                where[sample_file(data.samples[i][0])].add(name)
        assert len(where) == 12 and all(len(splits) == 1 for splits in where.values())
        assert {name for splits in where.values() for name in splits} == {"train", "val", "test"}
        labels = {data.samples[i][1] for i in data.split["val"]}
        assert labels == {0, 1}


def test_the_feature_cache_keys_and_computes_tiles(tmp_path, backbone_weights):
    """Real ImageNet features (random-init ones are all near 0): each tile's cached
    features are its own crop's."""
    from crack_lightning.models.classifier import CrackClassifier

    photo = write_photo(tmp_path, "p.png", 48, 32)
    tiles = [f"{photo}#0,0,32", f"{photo}#16,0,32", f"{photo}#8,0,32"]
    torch.manual_seed(0)
    net = CrackClassifier(
        backbone="mobilenet_v2",
        pretrained=True,
        weights_path=str(backbone_weights),
        freeze_backbone=True,
        channels_last=False,
        dropout=0.0,
        lr=1e-3,
        weight_decay=0.0,
        scheduler=None,
        image_size=32,
    ).net.eval()
    key = cache_key(net.backbone, tiles[:2], 32, 1)
    assert cache_key(net.backbone, [tiles[0], tiles[2]], 32, 1) != key  # the tile counts
    stat = os.stat(photo)
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache_key(net.backbone, tiles[:2], 32, 1) != key  # so does its photo
    cache = cached_features(
        net, tiles, [0, 1], [2], 1, 32, tmp_path / "cache", 2, 0, torch.device("cpu"), "stop"
    )
    assert cache.done.all()
    with torch.no_grad():
        direct = net.features(torch.stack([decode(tile, 32) for tile in tiles]))
    cached = cache.features[0].float()
    torch.testing.assert_close(cached, direct, atol=1e-3, rtol=1e-2)  # float16 storage
    distance = (cached[0] - cached[1]).norm() / cached[0].norm()
    assert distance > 0.2  # distinct crops, distinct features


def test_a_short_training_run_on_a_masks_source(tmp_path, synthetic_root):
    """Real cracktile photos in 64 px tiles beside a folder source, frozen random-init
    backbone (the feature cache path), one epoch: it trains, scores each source, and the
    manifest lists every tile by photo."""
    from crack_lightning.training.run import train

    root = copy_cracktile(tmp_path / "ct", 10)
    run = tmp_path / "run"
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={run}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            *QUIET,
            *SMALL,
            "logger=none",
            "+data/sources@data.sources.tiles=masks",
            f"data.sources.tiles.root={root}",
            "data.sources.tiles.tile_size=64",
            "data.sources.tiles.stride=64",
            "+data/sources@data.sources.synth=folder",
            f"data.sources.synth.root={synthetic_root}",
            "+trainer.limit_train_batches=3",
        ],
    )
    train(cfg)
    assert (run / "checkpoints" / "best.ckpt").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/tiles/bal_acc", "val/synth/bal_acc"} <= set(metrics)
    assert list((tmp_path / "cache" / "features").glob("features_*.pt"))  # cached tiles
    with (run / "split_manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["source"] for row in rows} == {"tiles", "synth"}
    rows = [row for row in rows if row["source"] == "tiles"]
    expected = tile_source(spec(root, "tile_size=64", "stride=64"))
    assert len(expected) > 10 * 8  # of 16 tiles a photo, few left out
    label_of = {path: ("Negative", "Positive")[label] for path, label in expected}
    assert {f"{root}/{row['path']}": row["label"] for row in rows} == label_of
    by_photo = defaultdict(set)
    for row in rows:
        photo, tile = split_tile(row["path"])
        assert tile is not None and tile[2] == 64
        by_photo[photo].add(row["split"])
    assert len(by_photo) == 10 and all(len(splits) == 1 for splits in by_photo.values())


def test_crack_data_check_counts_tiles_and_names_a_missing_mask(tmp_path, capsys):
    from crack_lightning.commands.data import main

    root = copy_cracktile(tmp_path / "ct", 4)
    args = [
        "check",
        "+data/sources@data.sources.tiles=masks",
        f"data.sources.tiles.root={root}",
        "data.sources.tiles.tile_size=64",
        "data.sources.tiles.stride=64",
    ]
    assert main(args) == 0
    samples = tile_source(spec(root, "tile_size=64", "stride=64"))
    crack = sum(label for _, label in samples)
    out = capsys.readouterr().out
    assert (
        f"4 photos with masks, {len(samples)} tiles ({len(samples) - crack} Negative, "
        f"{crack} Positive); {4 * 16 - len(samples)} tiles left out" in out
    )
    assert "OK: nothing that would corrupt training" in out
    os.remove(root / "tile_002_mask.png")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert (
        f"No crack mask for {root / 'tile_002.png'}: expected {root / 'tile_002_mask.png'}" in out
    )
    assert "FAILED: 1 problems" in out


def bad_input(tmp_path: Path, case: str) -> Path:
    """A masks folder with one kind of mistake."""
    root = tmp_path / case
    write_photo(root, "p.png", 32, 16)
    if case == "no mask":
        write_mask(root / "q_mask.png", np.zeros((16, 32)))
    elif case == "other aspect ratio":
        write_mask(root / "p_mask.png", np.zeros((16, 16)))
    elif case == "colour photo as mask":
        write_photo(root, "p_mask.png", 32, 16, seed=1)
    elif case == "no photos":
        os.remove(root / "p.png")
        write_mask(root / "p_mask.png", np.zeros((16, 32)))
    elif case == "too small":
        write_mask(root / "p_mask.png", np.zeros((16, 32)))
    return root


BAD_INPUTS = {
    "no mask": "No crack mask for {root}/p.png: expected {root}/p_mask.png",
    "other aspect ratio": "Crack mask {root}/p_mask.png is 16x16 but its photo {root}/p.png is",
    "colour photo as mask": "Crack mask {root}/p_mask.png (of {root}/p.png) is in colour",
    "no photos": "data.sources.tiles.root={root} holds no photos",
    "too small": "Photo {root}/p.png is 32x16, smaller than data.sources.tiles.tile_size=24",
}


@pytest.mark.parametrize(("case", "message"), BAD_INPUTS.items())
def test_bad_input_is_one_line_naming_the_file(tmp_path, case, message):
    root = bad_input(tmp_path, case)
    size = "tile_size=24" if case == "too small" else "tile_size=8"
    with pytest.raises(DataError) as caught:
        load_sources([spec(root, size, "stride=8")], 0.3, 0.0, 0, check=True)
    assert message.format(root=root) in str(caught.value)
    assert str(caught.value).startswith("data.sources.tiles")
    assert "\n" not in str(caught.value)


def test_a_smaller_mask_of_the_photos_shape_is_scaled_up(tmp_path):
    write_photo(tmp_path, "p.png", 32, 16)
    small = np.zeros((8, 16), dtype=np.uint8)
    small[:, 4:] = 255  # photo columns 8.. are crack
    write_mask(tmp_path / "p_mask.png", small)
    tiles = labelled(tile_source(spec(tmp_path, "tile_size=8", "stride=8", "ambiguous=null")))
    assert tiles == {
        (0, 0): 0, (8, 0): 1, (16, 0): 1, (24, 0): 1,
        (0, 8): 0, (8, 8): 1, (16, 8): 1, (24, 8): 1,
    }  # fmt: skip


BAD_SETTINGS = {
    "tile_size=0": "tile_size=0 must be pixels >= 1",
    "min_share=1.5": "min_share=1.5 must be a share",
    "ambiguous=[0.5,0.1]": "ambiguous=[0.5, 0.1] must be null or [low, high]",
    "mask_values={300:crack}": "mask_values={300: 'crack'} must be a mapping of grey levels",
    "mask_values={255:cracked}": "mask_values={255: 'cracked'} must be a mapping, each value",
    "split=random": "split=random must be photo",
    "root=null": "root is not set",
}


@pytest.mark.parametrize(("override", "message"), BAD_SETTINGS.items())
def test_bad_settings_name_the_setting(tmp_path, override, message):
    with pytest.raises(DataError) as caught:
        spec(tmp_path, override)
    assert f"data.sources.tiles.{message}" in str(caught.value)


def test_a_root_that_is_not_a_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data.sources.tiles.root=.*missing is not a folder"):
        tile_source(spec(tmp_path / "missing"))


def test_tiles_are_cut_from_the_photo_as_shown_exif_turned(tmp_path):
    """A JPEG stored 32x16 with EXIF orientation 6 shows 16x32: its tiles and its mask
    are in the turned photo's pixels, as every decode gives it."""
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[decoding.EXIF_ORIENTATION] = 6
    Image.fromarray(stored).save(tmp_path / "p.jpg", exif=exif)
    assert (
        decoding.oriented_size(tmp_path / "p.jpg") == (16, 32) == load_rgb(tmp_path / "p.jpg").size
    )
    write_mask(tmp_path / "p_mask.png", np.zeros((32, 16)))
    tiles = labelled(tile_source(spec(tmp_path, "tile_size=16", "stride=16")))
    assert sorted(tiles) == [(0, 0), (0, 16)]


def test_tiles_decode_in_the_workers_when_decoding_on_the_device(tmp_path):
    from crack_lightning.data.decode import EncodedImages

    photo = write_photo(tmp_path, "p.png", 40, 30)
    images = EncodedImages([(f"{photo}#8,2,24", 1)], 16)
    image, label = images[0]
    assert label == 1 and torch.equal(image, decode(f"{photo}#8,2,24", 16))


def test_a_source_whose_masks_are_all_empty_is_told_so(tmp_path):
    """One masks source, every mask black: no tile is crack, and the message says that
    (not that its images are copies of another source's: there is no other source)."""
    from crack_lightning.data.sources import parse_sources
    from crack_lightning.data.splits import load_sources

    for i in range(4):
        photo = write_photo(tmp_path / "site", f"p{i}.png", 64, 64, seed=i)
        write_mask(photo.with_name(f"p{i}_mask.png"), np.zeros((64, 64)))
    sources = parse_sources(settings(tmp_path / "site", "tile_size=32", "stride=32"))
    with pytest.raises(DataError) as caught:
        load_sources(sources, 0.25, 0.0, 0, check=False)
    message = str(caught.value)
    assert "copies" not in message
    assert "has no Positive image left in train or val" in message
    assert "its masks mark none of its 16 tiles as crack (every mask is empty" in message
