"""Adapting a trained model to a site (experiment=adapt, training/adapt.py): a model
trained on real METU images calls a tiled wall's joints cracks; adapted with 6 labelled
photos of that wall it scores 3 held-out photos of it better, replays a share of METU,
stores a threshold, scans the site's validation photos at the end with the start and the
adapted checkpoints (before_after.html, figures equal to crack-scan-eval's). A site that
mixes masked photos and marked crops is two sources. Bad init_from and site folders are one
line naming the setting, a site too small its minimum of each kind."""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from crack_lightning.data.masks import load_mask
from crack_lightning.data.synthetic import concrete_texture, draw_crack
from crack_lightning.errors import ConfigError, DataError
from crack_lightning.evaluation.before_after import PAGE_NAME
from crack_lightning.evaluation.scan_masks import patch_truth, score_groups
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.scan import ScanSettings, scan_files

from .conftest import QUIET, compose_config, run_train_py
from .test_before_after import page_rows

TILE = 64
WINDOW = ScanSettings(TILE, TILE, None)
CROP = 100  # an inspector's marks (the page's window) and the mixed site's tiles


def tiled_wall(folder: Path, name: str, seed: int, size: int = 192) -> Path:
    """Grey wall tiles with dark joints through the middle of every 64 px tile (not
    cracks) and a thin dark crack in about half of the tiles; its mask marks the cracks."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.normal(170, 12, (size, size, 3)).clip(0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    draw, marks = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for at in range(TILE // 2, size, TILE):
        draw.line([(at, 0), (at, size)], fill=(60, 60, 60), width=3)
        draw.line([(0, at), (size, at)], fill=(60, 60, 60), width=3)
    for top in range(0, size, TILE):
        for left in range(0, size, TILE):
            if rng.random() < 0.5:
                points = [(left + 6 + rng.integers(0, 12), top + 6 + rng.integers(0, 12))]
                for _ in range(6):
                    x, y = points[-1]
                    points.append(
                        (
                            min(x + rng.integers(3, 10), left + TILE - 4),
                            min(y + rng.integers(3, 10), top + TILE - 4),
                        )
                    )
                draw.line(points, fill=(25, 25, 25), width=2)
                marks.line(points, fill=255, width=2)
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{name}.png")
    mask.save(folder / f"{name}_mask.png")
    return folder / f"{name}.png"


@pytest.fixture(scope="module")
def walls(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The site (6 photos with masks) and 3 held-out photos of the same wall."""
    root = tmp_path_factory.mktemp("walls")
    for index in range(6):
        tiled_wall(root / "site", f"wall_{index}", index)
    return root / "site", [tiled_wall(root / "held", f"held_{i}", 100 + i) for i in range(3)]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, sample_root, backbone_weights) -> Path:
    """Real ImageNet features and a head trained 2 epochs on the 481 METU images at 64 px."""
    from crack_lightning.training.run import train

    root = tmp_path_factory.mktemp("base")
    train(compose_config("train", base_overrides(root, sample_root, backbone_weights)))
    return root / "run" / "checkpoints" / "best.ckpt"


def base_overrides(root: Path, sample_root: Path, weights: Path) -> list[str]:
    return [
        f"paths.output_dir={root / 'run'}",
        f"paths.cache_dir={root / 'cache'}",
        f"model.weights_path={weights}",
        "+data/sources@data.sources.metu=folder",
        f"data.sources.metu.root={sample_root}",
        "data.image_size=64",
        "trainer.max_epochs=2",
        "logger=none",
        *QUIET,
    ]


def adapt_overrides(ckpt: Path, site: Path, run: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "experiment=adapt",
        f"init_from={ckpt}",
        f"data.sources.site.root={site}",
        f"data.sources.site.tile_size={TILE}",
        f"data.sources.site.stride={TILE}",
        f"paths.data_dir={run / 'no_data_here'}",
        f"model.weights_path={weights}",
        f"paths.output_dir={run}",
        f"paths.cache_dir={run.parent / 'cache'}",
        *QUIET,
        *extra,
    ]


def held_out_scores(ckpt: Path, photos: list[Path], out: Path) -> tuple[float, float]:
    """Patch F1 of the held-out photos at the model's stored threshold, and the mean
    cross-entropy of their patches' P(crack)."""
    model = load_classifier(ckpt, "cpu")
    threshold = model.threshold if model.threshold is not None else 0.5
    scans = scan_files(model, photos, WINDOW, 32, threshold, out, [])
    _, rows = score_groups([("held", photos)], scans, 0.01)
    truth, probs = [], []
    for result in scan_files(model, photos, WINDOW, 32, threshold, out, []):
        truth.append(patch_truth(result, load_mask(result.path, (192, 192)), 0.01))
        probs.append(result.probs.clip(1e-6, 1 - 1e-6))
    truth, probs = np.concatenate(truth), np.concatenate(probs)
    loss = -np.where(truth, np.log(probs), np.log(1 - probs)).mean()
    return rows[0]["f1"], float(loss)


def manifest(run: Path) -> list[dict]:
    with (run / "split_manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_adapt_improves_held_out_photos_of_the_site(tmp_path, base_ckpt, walls, backbone_weights):
    from crack_lightning.training.run import train

    site, held = walls
    run = tmp_path / "adapted"
    cfg = compose_config("train", adapt_overrides(base_ckpt, site, run, backbone_weights))
    train(cfg)
    adapted = run / "checkpoints" / "best.ckpt"
    f1_before, loss_before = held_out_scores(base_ckpt, held, tmp_path / "scans")
    f1_after, loss_after = held_out_scores(adapted, held, tmp_path / "scans")
    # the METU model calls the joints cracks: every patch (F1 2/3 here); adapted, it tells
    # them apart (measured: F1 1.0, loss 0.49 -> 0.01)
    assert f1_after > f1_before + 0.1 and loss_after < loss_before / 2
    # a new threshold chosen on validation is stored with the model
    assert "decision_threshold" in torch.load(adapted, weights_only=True)
    # a quarter of METU's training images replayed, all its validation images kept
    rows = manifest(run)
    old = manifest(base_ckpt.parent.parent)
    for split, share in (("train", 0.25), ("val", 1.0)):
        before = sum(r["split"] == split for r in old)
        assert sum(r["source"] == "metu" and r["split"] == split for r in rows) == round(
            share * before
        )
    # the site's validation photos scanned with the best checkpoint at the end
    val_photos = {
        r["path"].split("#")[0] for r in rows if r["source"] == "site" and r["split"] == "val"
    }
    with (run / "scan_eval" / "scan_summary.csv").open() as handle:
        (summary,) = list(csv.DictReader(handle))
    assert summary["folder"] == "site" and int(summary["photos"]) == len(val_photos) >= 1
    assert int(summary["patches"]) == 9 * len(val_photos)
    report = json.loads((run / "scan_eval" / "scan_eval.json").read_text())
    assert {name.split("/")[-1] for name in report} == val_photos
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/site/bal_acc", "val/metu/bal_acc"} <= set(metrics)
    before_and_after_page_is_crack_scan_evals(run, site, sorted(val_photos), base_ckpt, tmp_path)


def before_and_after_page_is_crack_scan_evals(
    run: Path, site: Path, photos: list[str], start: Path, tmp_path: Path
) -> None:
    """RUN/before_after.html: offline, one row per validation photo of the site with its
    overlay before and after inlined, and each photo's figures crack-scan-eval's for
    init_from (before) and the adapted checkpoint (after) on the same photos."""
    from crack_lightning.commands import scan_eval

    page = (run / PAGE_NAME).read_text()
    assert "<script" not in page.lower() and not re.search(r"https?://", page)
    rows = page_rows(page, "photo")
    assert [re.search(r"<b>site/(.*?)</b>", cells[0])[1] for _, cells in rows] == photos
    figures: dict[str, list[dict]] = {}
    for ckpt, out in ((start, tmp_path / "before"), (run / "checkpoints" / "best.ckpt", tmp_path)):
        items = ",".join(str(site / photo) for photo in photos)
        args = [f"ckpt_path={ckpt}", f"photos=[{items}]", f"out={out / 'eval'}", "device=cpu"]
        assert scan_eval.main([*args, f"scan.patch_size={TILE}", f"scan.stride={TILE}"]) == 0
        report = json.loads((out / "eval" / "scan_eval.json").read_text())
        for photo in photos:
            figures.setdefault(photo, []).append(report[photo])
    for (warned, cells), photo in zip(rows, photos, strict=True):
        assert len(re.findall(r'<img [^>]*src="data:image/jpeg;base64,', "".join(cells))) == 2
        old, new = figures[photo]
        assert cells[3:] == [html.escape(c) for c in photo_cells_by_hand(old, new)], (
            f"{photo}: the page's figures are not crack-scan-eval's"
        )
        assert warned == (new["found_patches"] < old["found_patches"])
    # the folder's line: the photos' patches pooled (micro figures), as in the log
    pooled = [
        {k: sum(figures[photo][side][k] for photo in photos) for k in POOLED} for side in (0, 1)
    ]
    for counts in pooled:
        found, alarms, cracked = (counts[k] for k in POOLED)
        p = found / (found + alarms) if found + alarms else None
        r = found / cracked if cracked else None
        counts |= {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p and r else 0.0}
    ((warned, cells),) = page_rows(page, "folder")
    assert cells == ["site", str(len(photos)), *map(html.escape, photo_cells_by_hand(*pooled)[2:])]
    assert warned == (pooled[1]["found_patches"] < pooled[0]["found_patches"])


POOLED = ("found_patches", "false_alarms", "cracked_patches")


def photo_cells_by_hand(old: dict, new: dict) -> list[str]:
    def three(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return [
        f"{old['found_patches']} -> {new['found_patches']} of {new['cracked_patches']}",
        f"{old['false_alarms']} -> {new['false_alarms']}",
        *(f"{three(old.get(k))} -> {three(new.get(k))}" for k in ("precision", "recall", "f1")),
        f"{three(old.get('pixel_f1'))} -> {three(new.get('pixel_f1'))}",
    ]


def test_a_site_of_labelled_tiles_and_the_checkpoints_split(tmp_path, base_ckpt, backbone_weights):
    """Positive/ and Negative/ folders (an inspector's marks) are read as a folder source;
    the replayed source and split settings are the checkpoint's."""
    from crack_lightning.training.adapt import prepare_start

    site = tmp_path / "marks"
    for label in ("Positive", "Negative"):
        (site / label).mkdir(parents=True)
        for index in range(2):  # the fewest the checkpoint's fractions split (0.3, 0.0)
            Image.new("RGB", (64, 64), (90, 90, index)).save(site / label / f"tile{index}.png")
    run = tmp_path / "run"
    cfg = compose_config(
        "train",
        adapt_overrides(base_ckpt, site, run, backbone_weights, "seed=7", "data.val_fraction=0.5"),
    )
    start = prepare_start(cfg)
    sources = cfg.data.sources
    assert list(sources) == ["metu", "site"] and start.replayed == ["metu"]
    assert "kind" not in sources.site and sources.site.root == str(site)
    assert sources.site.classes.Positive == ["Positive"]
    assert (cfg.data.seed, cfg.data.val_fraction, cfg.data.image_size) == (42, 0.3, 64)


# --- a site of masked photos and marked crops ----------------------------------------


def crops(folder: Path, negative: int, positive: int, seed: int = 0) -> None:
    """Marked crops as the page saves them: folder/Negative/ and folder/Positive/."""
    rng = np.random.default_rng(seed)
    for label, count in (("Negative", negative), ("Positive", positive)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image = Image.fromarray(concrete_texture(rng, CROP))
            if label == "Positive":
                image = draw_crack(image, rng)
            image.save(folder / label / f"wall_0123456789ab_x{index * 100:04d}_y0000_s100.png")


def masked_photos(folder: Path, count: int) -> None:
    """count 200 x 200 photos with PHOTO_mask.png: of their four CROP px tiles, the top
    left and bottom right are cracked (a 3 px line, about 3% of the tile), the others
    clean."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        photo = Image.fromarray(concrete_texture(rng, 2 * CROP))
        mask = Image.new("L", photo.size)
        for left, top in ((0, 0), (CROP, CROP)):
            line = [
                (left + 10, top + 20 + 10 * index),
                (left + 50, top + 50),
                (left + 90, top + 70),
            ]
            ImageDraw.Draw(photo).line(line, fill=(30, 30, 30), width=3)
            ImageDraw.Draw(mask).line(line, fill=255, width=3)
        photo.save(folder / f"masked_{index}.png")
        mask.save(folder / f"masked_{index}_mask.png")


def mixed_site_cfg(ckpt: Path, site: Path, run: Path, weights: Path):
    """experiment=adapt on a site of masked photos tiled at CROP px."""
    overrides = adapt_overrides(ckpt, site, run, weights)
    return compose_config(
        "train",
        [*overrides, f"data.sources.site.tile_size={CROP}", f"data.sources.site.stride={CROP}"],
    )


def test_a_site_of_masked_photos_and_crops_is_two_sources(tmp_path, base_ckpt, backbone_weights):
    from crack_lightning.data.sources import parse_sources
    from crack_lightning.data.splits import load_sources
    from crack_lightning.training.adapt import prepare_start

    site = tmp_path / "site"
    masked_photos(site, 3)
    crops(site, 3, 4)
    cfg = mixed_site_cfg(base_ckpt, site, tmp_path / "run", backbone_weights)
    start = prepare_start(cfg)
    sources = cfg.data.sources
    # the checkpoint's own source replayed, the photos and the crops
    assert list(sources) == ["metu", "site", "site_crops"] and start.site == "site"
    assert sources.site.kind == "masks" and sources.site.exclude == ["Negative", "Positive"]
    assert "kind" not in sources.site_crops and sources.site_crops.root == str(site)
    del sources.metu  # the site's sources alone
    loaded = load_sources(parse_sources(sources), 0.3, 0.0, 0, check=False)
    names = [loaded.names[i] for i in loaded.source]
    # 3 photos x 4 tiles, all clearly cracked or clean; 3 + 4 crops
    assert names.count("site") == 12 and names.count("site_crops") == 7
    tiles = [sample for sample, name in zip(loaded.samples, names, strict=True) if name == "site"]
    assert {Path(path.split("#")[0]).parent for path, _ in tiles} == {site}
    assert sum(label for _, label in tiles) == 6  # two cracked tiles per photo
    # read without exclude, the photos' source would read the crops' folders too
    sources.site.exclude = None
    with pytest.raises(DataError, match="data.sources.site and data.sources.site_crops both"):
        load_sources(parse_sources(sources), 0.3, 0.0, 0, check=False)


def test_a_site_too_small_states_the_minimum_of_each_kind(tmp_path, base_ckpt, backbone_weights):
    from crack_lightning.training.adapt import prepare_start

    site = tmp_path / "site"
    masked_photos(site, 1)
    crops(site, 1, 2)
    # the checkpoint's fractions, 0.3 and 0: 2 crops of each class (one to validate, one
    # to train on), 2 photos (one for each split)
    with pytest.raises(DataError) as error:
        prepare_start(mixed_site_cfg(base_ckpt, site, tmp_path / "run", backbone_weights))
    assert str(error.value) == (
        f"data.sources.site.root={site} holds too few labelled images to adapt from: each "
        "kind is split on its own (data.val_fraction=0.3, data.test_fraction=0.0), so it "
        "needs at least 2 crops of each class in Positive/ and Negative/ (1 Negative, 2 "
        "Positive) and at least 2 masked photos, one for each split (1). Add images, or "
        "lower the fractions."
    )


@pytest.fixture
def not_checkpoints(tmp_path, backbone_weights) -> dict[str, Path]:
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    return {"a photo": photo, "backbone weights": backbone_weights, "missing": tmp_path / "x.ckpt"}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not given", "experiment=adapt needs init_from="),
        ("a photo", "could not be read as a tensors-only PyTorch file"),
        ("backbone weights", "is not a training checkpoint of this framework"),
        ("missing", "does not exist"),
    ],
)
def test_init_from_that_is_not_a_checkpoint_is_named(
    tmp_path, not_checkpoints, walls, backbone_weights, case, message
):
    from crack_lightning.training.run import train

    path = not_checkpoints.get(case)
    overrides = adapt_overrides(path, walls[0], tmp_path / "run", backbone_weights)
    cfg = compose_config("train", [o for o in overrides if o != "init_from=None"])
    with pytest.raises(ConfigError, match=message) as error:
        train(cfg)
    assert "\n" not in str(error.value)
    if path is not None:
        assert str(error.value).startswith(f"init_from={path} ")


def test_a_site_folder_without_photos_is_named(tmp_path, base_ckpt, backbone_weights):
    from crack_lightning.training.run import train

    site = tmp_path / "site"
    site.mkdir()
    Image.new("L", (64, 64)).save(site / "wall_mask.png")  # a mask without its photo
    cfg = compose_config(
        "train", adapt_overrides(base_ckpt, site, tmp_path / "run", backbone_weights)
    )
    with pytest.raises(DataError, match=f"data.sources.site.root={site} holds no photos"):
        train(cfg)


def test_the_command_prints_one_line_for_a_bad_init_from(tmp_path, walls, backbone_weights):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint")
    done = run_train_py(*adapt_overrides(bad, walls[0], tmp_path / "run", backbone_weights))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: init_from={bad} "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_batchnorm_statistics_are_the_sites(tmp_path, walls):
    """adapt.bn_stats: each BatchNorm layer's running mean becomes the mean of its input
    over the site's tiles (checked on the first layer; batches of equal size weigh the
    same), and the folded copy the frozen backbone runs follows."""
    from crack_lightning.data.decode import decode
    from crack_lightning.models.classifier import CrackClassifier
    from crack_lightning.training.adapt import batchnorm_layers, reestimate_batchnorm
    from crack_lightning.training.run import build

    cfg = compose_config(
        "train", ["model=mobilenetv3_small", "model.pretrained=false", "data.image_size=64"]
    )
    model: CrackClassifier = build(cfg.model)
    tiles = [f"{walls[0] / 'wall_0.png'}#{x},{y},64" for x in (0, 64, 128) for y in (0, 64)]
    images = torch.stack([decode(tile, 64) for tile in tiles])
    before = model.net.features(images)
    assert reestimate_batchnorm(model, tiles, batch_size=3, on_bad="stop") > 10
    first_conv, first_bn = model.net.backbone.features[0][0], batchnorm_layers(model.net)[0]
    with torch.no_grad():
        activations = first_conv(model.net.normalize(images))
    assert torch.allclose(first_bn.running_mean, activations.mean(dim=(0, 2, 3)), atol=1e-4)
    assert not first_bn.training and model.net.backbone.training is False
    assert not torch.allclose(model.net.features(images), before)
