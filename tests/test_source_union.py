"""The sources of a data set as one union: copies across sources never straddle the split,
no two sources read one folder, and no source silently drops out of training."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from crack_lightning.commands.data import main as cli
from crack_lightning.data import feature_cache
from crack_lightning.data.decode import sample_file
from crack_lightning.data.sources import parse_sources
from crack_lightning.data.splits import load_sources
from crack_lightning.errors import DataError
from crack_lightning.training.run import build

from .conftest import shared_path
from .test_masks_source import CRACKTILE, copy_cracktile
from .test_masks_source import settings as masks_settings
from .test_sources import sdnet_like, source, write_images


def two_sources(tmp_path: Path) -> tuple[Path, Path]:
    decks = sdnet_like(tmp_path / "sdnet", photos=10)
    bricks = tmp_path / "bricks"
    write_images(bricks / "Positive", [f"{i}.jpg" for i in range(20)])
    write_images(bricks / "Negative", [f"{i}.jpg" for i in range(20)], shade=100)
    return decks, bricks


def config(decks: Path, bricks: Path) -> dict:
    return {"decks": source(decks), "bricks": source(bricks, "bricks", "folder", split="random")}


def split_of(result, index: int) -> str:
    return next(name for name, indices in result.split.items() if index in indices)


@pytest.mark.parametrize("check", [True, False])
def test_copies_in_two_sources_land_in_one_split_with_a_warning(tmp_path, caplog, check):
    decks, bricks = two_sources(tmp_path)
    # every bricks image also sits in the decks source, under another name
    for label, folder in (("Positive", "Positive"), ("Negative", "Negative")):
        for image in sorted((bricks / label).iterdir()):
            shutil.copy(image, decks / folder / f"9{image.stem}-0.jpg")
    caplog.set_level(logging.WARNING)
    for seed in range(3):
        result = load_sources(parse_sources(config(decks, bricks)), 0.25, 0.0, seed, check=check)
        by_bytes: dict[bytes, set[str]] = {}
        for index, (path, _) in enumerate(result.samples):
            by_bytes.setdefault(Path(path).read_bytes(), set()).add(split_of(result, index))
        assert all(len(splits) == 1 for splits in by_bytes.values()), f"seed {seed}: a leak"
        everything = [i for indices in result.split.values() for i in indices]
        assert sorted(everything) == list(range(len(result.samples)))
    assert "40 of data.sources.bricks are copies of images in data.sources.decks" in caplog.text


def test_a_copy_with_the_other_label_in_another_source_is_refused(tmp_path):
    decks, bricks = two_sources(tmp_path)
    shutil.copy(bricks / "Positive" / "3.jpg", decks / "Negative" / "7099-0.jpg")
    with pytest.raises(DataError, match="in two sources with different labels"):
        load_sources(parse_sources(config(decks, bricks)), 0.25, 0.0, 0, check=True)


def test_two_sources_reading_one_folder_are_refused(tmp_path):
    decks, bricks = two_sources(tmp_path)
    again = {"bricks": source(bricks, "bricks", "folder", split="random")}
    twice = config(decks, bricks) | {"copy": again["bricks"]}
    with pytest.raises(DataError) as info:
        load_sources(parse_sources(twice), 0.25, 0.0, 0, check=False)
    assert "data.sources.bricks and data.sources.copy both read" in str(info.value)
    linked = tmp_path / "linked"
    linked.symlink_to(bricks, target_is_directory=True)
    twice["copy"] = twice["copy"] | {"root": str(linked)}
    with pytest.raises(DataError, match="both read"):
        load_sources(parse_sources(twice), 0.25, 0.0, 0, check=False)


def two_sources_set_up(make_cfg, tmp_path: Path, *extra: str) -> tuple[Path, object]:
    """The decks and bricks sources of two_sources, split, damaged files skipped."""
    decks, bricks = two_sources(tmp_path)
    cfg = make_cfg(
        "+data/sources@data.sources.decks=sdnet2018",
        f"data.sources.decks.root={decks}",
        "+data/sources@data.sources.bricks=folder",
        f"data.sources.bricks.root={bricks}",
        "data.sources.bricks.split=random",
        "data.on_bad_image=skip",
        *extra,
    )
    dm = build(cfg.data)
    dm.setup("fit")
    return bricks, dm


def test_a_source_whose_images_the_cache_skips_is_an_error_naming_it(make_cfg, tmp_path):
    """Every bricks file damaged beyond what the quick check sees: the feature cache skips
    them all (data.on_bad_image=skip); the source must not silently drop out."""
    bricks, dm = two_sources_set_up(make_cfg, tmp_path)
    bricks_index = dm.sources.names.index("bricks")
    done = torch.tensor([source != bricks_index for source in dm.sources.source])
    with pytest.raises(DataError) as info:
        dm._drop_uncached(done)
    message = str(info.value)
    assert message.startswith(f"data.sources.bricks.root={bricks} has no Negative image left")
    assert "40 of its 40 images are damaged and were skipped" in message
    assert "data.sources.bricks=null" in message


def test_a_source_whose_images_the_loaders_skip_is_an_error_at_the_end(make_cfg, tmp_path):
    _, dm = two_sources_set_up(make_cfg, tmp_path, "data.decode_on_device=false")
    loader = dm.val_dataloader()
    bricks_index = dm.sources.names.index("bricks")
    _, sources = dm.split_sources("val")
    for position, source_index in enumerate(sources):
        if source_index == bricks_index:
            loader.dataset.bad[position] = True  # as a worker marks a file it cannot read
    with pytest.raises(DataError, match="data.sources.bricks.root=.* has no .* image left in val"):
        dm.teardown("fit")


def test_a_class_emptied_in_val_is_named_too(make_cfg, tmp_path):
    _, dm = two_sources_set_up(make_cfg, tmp_path)
    val = set(dm.split["val"])
    done = torch.tensor(
        [
            not (i in val and source == 0 and label == 1)
            for i, (source, (_, label)) in enumerate(
                zip(dm.sources.source, dm.samples, strict=True)
            )
        ]
    )
    with pytest.raises(
        DataError, match=r"data.sources.decks.root=.* no Positive image left in val:"
    ):
        dm._drop_uncached(done)


def test_the_check_looks_for_copies_across_sources(tmp_path, capsys):
    decks, bricks = two_sources(tmp_path)
    shutil.copy(decks / "Positive" / "7000-0.jpg", bricks / "Positive" / "copy.jpg")
    shutil.copy(decks / "Positive" / "7000-1.jpg", bricks / "Negative" / "wrong.jpg")
    sources = [
        "+data/sources@data.sources.decks=sdnet2018",
        f"data.sources.decks.root={decks}",
        "+data/sources@data.sources.bricks=folder",
        f"data.sources.bricks.root={bricks}",
    ]
    assert cli(["check", *sources, "quick=true"]) == 1
    out = capsys.readouterr().out
    bricks_report = out[out.index("Source bricks") :]
    assert "Identical files in an earlier source" in bricks_report
    assert "  decks:Positive/7000-0.jpg = Positive/copy.jpg" in bricks_report
    assert "  decks:Positive/7000-1.jpg = Negative/wrong.jpg" in bricks_report
    assert "FAILED: 1 problems" in bricks_report
    assert cli(["check", *sources, f"data.sources.bricks.root={decks}"]) == 2
    assert "data.sources.decks and data.sources.bricks both read" in capsys.readouterr().err


class KeyTaken(Exception):
    """Stops the feature cache once its key is computed: the fill is not what is counted."""


@pytest.mark.parametrize("check", [True, False])
def test_a_run_lists_each_folder_once_and_keys_its_cache_without_a_stat(
    make_cfg, tmp_path, monkeypatch, check
):
    """The split, the check, copies across sources and the feature cache's key all read
    one listing of each source: in prepare_data, setup and the cache's key, every folder
    of every source (class folders, their sub-folders, a masks source's root) is listed
    once, and no image is stat-ed again for the key, which is the one fresh stats give."""
    decks = sdnet_like(tmp_path / "sdnet", photos=6, layout="sdnet")
    bricks = tmp_path / "bricks"
    write_images(bricks / "Positive", [f"{i}.jpg" for i in range(12)])
    write_images(bricks / "Positive" / "wall", [f"w{i}.jpg" for i in range(4)])
    write_images(bricks / "Negative", [f"{i}.jpg" for i in range(16)], shade=100)
    tiles = copy_cracktile(tmp_path / "tiles", 4)
    cfg = make_cfg(
        "+data/sources@data.sources.decks=sdnet2018",
        f"data.sources.decks.root={decks}",
        "+data/sources@data.sources.bricks=folder",
        f"data.sources.bricks.root={bricks}",
        "data.sources.bricks.split=random",
        "+data/sources@data.sources.tiles=masks",
        f"data.sources.tiles.root={tiles}",
        "data.sources.tiles.tile_size=64",
        f"data.check={str(check).lower()}",
        "data.cache_views=1",
    )
    folders = {os.path.realpath(d) for r in (decks, bricks, tiles) for d, _, _ in os.walk(r)}
    assert len(folders) == 9
    listed, stat_ed = Counter(), []
    real_scandir, real_listdir, real_stat = os.scandir, os.listdir, os.stat

    def scandir(path="."):
        listed[os.path.realpath(path)] += 1
        return real_scandir(path)

    def listdir(path="."):
        listed[os.path.realpath(path)] += 1
        return real_listdir(path)

    def stat(path, *args, **kwargs):
        if not isinstance(path, int):
            stat_ed.append(os.path.realpath(path))
        return real_stat(path, *args, **kwargs)

    keys = []
    real_key = feature_cache.cache_key

    def key_only(*args, **kwargs):
        keys.append(real_key(*args, **kwargs))
        raise KeyTaken

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(feature_cache, "cache_key", key_only)
    dm = build(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    backbone = torch.nn.Linear(2, 2)
    with pytest.raises(KeyTaken):
        dm.use_feature_cache(SimpleNamespace(backbone=backbone), torch.device("cpu"))
    monkeypatch.undo()
    assert dict(listed) == dict.fromkeys(folders, 1)
    files = [path for path, _ in dm.samples]
    assert len(dm.sources.names) == 3 and len(files) > 104  # 72 crops, 32 bricks, tiles
    assert {os.path.realpath(sample_file(path)) for path in files} & set(stat_ed) == set()
    assert keys == [feature_cache.cache_key(backbone, files, 224, 1, dm.augmentation)]


def two_masks_sources(tmp_path: Path, copies: int) -> tuple[Path, Path]:
    """Two masks sources of cracktile photos; the second also holds byte copies (under
    other names, with their masks) of the first's first `copies` photos."""
    site = copy_cracktile(tmp_path / "site", 10)
    other = tmp_path / "other"
    other.mkdir()
    photos = sorted(shared_path(CRACKTILE).glob("tile_*[0-9].png"))
    for photo in photos[10:20]:
        shutil.copy(photo, other / photo.name)
        shutil.copy(photo.with_name(f"{photo.stem}_mask.png"), other)
    for photo in sorted(site.glob("tile_*[0-9].png"))[:copies]:
        shutil.copy(photo, other / f"copy_{photo.name}")
        shutil.copy(
            photo.with_name(f"{photo.stem}_mask.png"), other / f"copy_{photo.stem}_mask.png"
        )
    return site, other


@pytest.mark.parametrize("check", [True, False])
def test_copies_of_photos_in_two_masks_sources_land_in_one_split_with_a_warning(
    tmp_path, caplog, check
):
    """Tiles of byte-identical photos in two masks sources are copies like any file's:
    every tile of a photo and of its copies sits in one split, and the warning counts them."""
    site, other = two_masks_sources(tmp_path, copies=4)
    config = {
        "site": masks_settings(site, "tile_size=64", "stride=64", name="site")["site"],
        "other": masks_settings(other, "tile_size=64", "stride=64", name="other")["other"],
    }
    caplog.set_level(logging.WARNING)
    for seed in range(4):
        result = load_sources(parse_sources(config), 0.3, 0.0, seed, check=check)
        by_bytes: dict[bytes, set[str]] = {}
        for index, (path, _) in enumerate(result.samples):
            content = Path(sample_file(path)).read_bytes()
            by_bytes.setdefault(content, set()).add(split_of(result, index))
        assert len(by_bytes) == 20
        leaks = [splits for splits in by_bytes.values() if len(splits) > 1]
        assert not leaks, f"seed {seed}: {len(leaks)} photos straddle the split"
        everything = [i for indices in result.split.values() for i in indices]
        assert sorted(everything) == list(range(len(result.samples)))
    tiles = sum(Path(sample_file(path)).name.startswith("copy_") for path, _ in result.samples)
    assert 48 <= tiles <= 64  # 4 copied 256x256 photos, 16 tiles each, less the left out
    assert f"{tiles} of data.sources.other are copies of images in data.sources.site" in (
        caplog.text
    )


def test_a_copied_photo_whose_mask_labels_a_tile_otherwise_is_refused(tmp_path):
    site, other = two_masks_sources(tmp_path, copies=1)
    mask = next(other.glob("copy_*_mask.png"))
    inverted = 255 - np.asarray(Image.open(mask).convert("L"))
    Image.fromarray(inverted).save(mask)
    config = {
        "site": masks_settings(site, "tile_size=64", "stride=64", name="site")["site"],
        "other": masks_settings(other, "tile_size=64", "stride=64", name="other")["other"],
    }
    with pytest.raises(DataError, match="in two sources with different labels .*copy_tile_001"):
        load_sources(parse_sources(config), 0.3, 0.0, 0, check=True)


def test_the_check_lists_copies_of_photos_across_masks_sources(tmp_path, capsys):
    site, other = two_masks_sources(tmp_path, copies=2)
    sources = [
        "+data/sources@data.sources.site=masks",
        f"data.sources.site.root={site}",
        "+data/sources@data.sources.other=masks",
        f"data.sources.other.root={other}",
        "data.sources.site.tile_size=64",
        "data.sources.other.tile_size=64",
    ]
    assert cli(["check", *sources, "quick=true"]) == 0
    out = capsys.readouterr().out
    other_report = out[out.index("Source other") :]
    assert "Identical files in an earlier source" in other_report
    assert "  site:tile_001.png = copy_tile_001.png" in other_report
    assert "  site:tile_002.png = copy_tile_002.png" in other_report
