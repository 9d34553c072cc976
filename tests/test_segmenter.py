"""The crack-map model: its training targets, loss and scores, and a short run from masked
photos to a scan whose tiles follow from its map."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from crack_lightning.data.masks import UNKNOWN, MaskedImages
from crack_lightning.data.transforms import Augmentation, augment_batch
from crack_lightning.errors import ModelConfigError
from crack_lightning.evaluation.before_after import PAGE_NAME
from crack_lightning.inference.crack_maps import LINE_COLOUR
from crack_lightning.models.crack_map import tile_scores
from crack_lightning.models.segmenter import PixelCounts, map_loss

from .conftest import QUIET, compose_config
from .test_before_after import page_rows
from .test_masks_source import spec


def test_a_tiles_score_from_its_map_agrees_with_the_tile_rule():
    """tile score >= t exactly when at least min_share of the tile's pixels are >= t."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 1, 20, 20, generator=generator) ** 4  # mostly low, a few high
    for min_share in (0.01, 0.05, 0.07, 0.5):
        scores = tile_scores(probs, min_share)
        for threshold in (0.1, 0.3, 0.5, 0.9):
            rule = (probs >= threshold).flatten(1).float().mean(dim=1) >= min_share
            assert torch.equal(scores >= threshold, rule), (min_share, threshold)


def line_map(column: int, rows: slice = slice(None)) -> torch.Tensor:
    pixels = torch.zeros(1, 1, 32, 32)
    pixels[0, 0, rows, column] = 1
    return pixels


@pytest.mark.parametrize(
    ("predicted", "tolerance", "precision", "recall"),
    [
        (line_map(12), 2.0, 1.0, 1.0),  # 2 px beside the true line: right within 2 px
        (line_map(12), 1.0, 0.0, 0.0),  # ... and wrong within 1 px
        # the top half found: true rows 0-17 lie within 2 px of a found one (18 of 32)
        (line_map(10, slice(0, 16)), 2.0, 1.0, 18 / 32),
    ],
)
def test_pixel_scores_with_a_tolerance_by_hand(predicted, tolerance, precision, recall):
    truth = line_map(10).to(torch.uint8)
    counts = PixelCounts(tolerance, threshold=0.5)
    counts.update(predicted, truth)
    scores = counts.compute()
    assert scores["pixel_precision"] == pytest.approx(precision)
    assert scores["pixel_recall"] == pytest.approx(recall)


def test_unknown_pixels_are_not_scored():
    truth = line_map(10).to(torch.uint8)
    truth[..., 16:, :] = UNKNOWN
    counts = PixelCounts(0.0, threshold=0.5)
    counts.update(line_map(10), truth)  # the unknown half predicted crack: not counted
    assert counts.compute()["pixel_precision"] == 1.0
    assert counts.true == 16


def test_a_crack_crop_without_a_mask_teaches_only_its_strongest_pixel():
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    with torch.no_grad():
        logits[0, 0, 3, 5] = 2.0
    masks = torch.full((2, 1, 8, 8), UNKNOWN, dtype=torch.uint8)
    loss = map_loss(logits, masks, torch.tensor([1, 0]))
    loss.backward()
    moved = torch.nonzero(logits.grad)
    assert moved.tolist() == [[0, 0, 3, 5]]  # the strongest pixel of the crack crop only
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)))  # BCE(2.0, crack)


def test_masks_follow_their_images_through_augmentation():
    """Flips and rotation move a mask with its image; unknown pixels stay unknown."""
    torch.manual_seed(0)
    images = torch.zeros(16, 3, 32, 32, dtype=torch.uint8)
    images[..., :, 5] = 255  # a bright vertical line, marked crack
    masks = torch.zeros(16, 1, 32, 32, dtype=torch.uint8)
    masks[..., :, 5] = 1
    masks[..., :, 20:] = UNKNOWN
    augmentation = Augmentation.from_config(
        compose_config("train", ["data/augmentation=flip_rotate"]).data.augmentation
    )
    moved_images, moved_masks = augment_batch(images, augmentation, masks)
    bright = moved_images.mean(dim=1, keepdim=True) > 0.5
    crack = moved_masks == 1
    assert (crack & ~bright).sum() <= 0.05 * crack.sum()  # resampling edges aside
    assert (bright & ~crack & (moved_masks != UNKNOWN)).sum() <= 0.05 * bright.sum()
    share_unknown = (moved_masks == UNKNOWN).float().mean().item()
    assert 0.3 < share_unknown < 0.5  # 12 of 32 columns, wherever they went
    assert set(moved_masks.unique().tolist()) <= {0, 1, UNKNOWN}


def write_masked_photo(folder: Path, name: str, size: int, seed: int, joint: bool = False) -> Path:
    """A grey, noisy photo with a dark 2 px crack from top to bottom, and its mask. With
    `joint`, a site unlike that: a darker straight board joint across the photo (not
    crack: its mask is empty there) beside a fainter crack."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grey = rng.normal(150, 12, (size, size)).clip(0, 255)
    mask = np.zeros((size, size), dtype=np.uint8)
    if joint:
        top = int(rng.integers(10, size - 14))
        grey[top : top + 4, :] = 40
    column = int(rng.integers(8, size - 8))
    for row in range(size):
        x = column + int((5 if joint else 6) * math.sin(row / (7 if joint else 9) + seed))
        grey[row, x : x + 2] = 95 if joint else 50
        mask[row, x : x + 2] = 255
    Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)).save(
        folder / f"{name}.png"
    )
    Image.fromarray(mask, mode="L").save(folder / f"{name}_mask.png")
    return folder / f"{name}.png"


def test_a_tile_brings_its_crop_of_the_mask_and_a_crop_what_its_label_says(tmp_path):
    root = tmp_path / "site"
    photo = write_masked_photo(root, "p0", 96, seed=1)
    mask = np.asarray(Image.open(root / "p0_mask.png")) > 127
    tiles = spec(root, "tile_size=48", "stride=48")
    samples = [(f"{photo}#48,0,48", 1), (str(photo), 0), (str(photo), 1)]
    data = MaskedImages(samples, [tiles, None, None], 48, "stop")
    image, target = data[0]
    assert image.shape == (3, 48, 48) and target["label"] == 1
    assert np.array_equal(target["mask"][0].numpy() == 1, mask[0:48, 48:96])
    assert int(data[1][1]["mask"].max()) == 0  # a not-crack crop: an empty mask
    assert bool((data[2][1]["mask"] == UNKNOWN).all())  # a crack crop: somewhere, unknown


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=segmenter"], r"learns from masks, but data\.targets=labels"),
        (["data.targets=masks"], r"learns from labels, but data\.targets=masks"),
    ],
)
def test_model_and_targets_must_agree(make_cfg, overrides, message):
    from crack_lightning.training.check import check_train_settings

    with pytest.raises(ModelConfigError, match=message):
        check_train_settings(make_cfg(*overrides))


@pytest.fixture(scope="module")
def map_run(tmp_path_factory, backbone_weights) -> Path:
    """experiment=crack_maps on 8 masked photos (96 px, 48 px crops), the real ImageNet
    encoder, three epochs: a crack-map checkpoint."""
    from crack_lightning.training.run import train

    tmp = tmp_path_factory.mktemp("maps")
    for i in range(8):
        write_masked_photo(tmp / "data" / "site", f"p{i}", 96, seed=i)
    run = tmp / "run"
    cfg = compose_config(
        "train",
        [
            "experiment=crack_maps",
            f"paths.output_dir={run}",
            f"paths.data_dir={tmp / 'data'}",
            *QUIET,
            "logger=none",
            f"model.weights_path={backbone_weights}",
            "data.sources.crackforest=null",
            "data.sources.cracktile=null",
            "data.sources.masonry=null",
            "+data/sources@data.sources.site=masks",
            f"data.sources.site.root={tmp / 'data' / 'site'}",
            "data.sources.site.tile_size=48",
            "data.sources.site.stride=48",
            "data.sources.site.ambiguous=null",
            "data.image_size=48",
            "data.batch_size=8",
            "data.val_fraction=0.25",
            "data.test_fraction=0",
            "trainer.max_epochs=3",
        ],
    )
    train(cfg)
    return run


def test_a_scan_with_a_crack_map_writes_the_map_and_tiles_that_follow_it(map_run, tmp_path):
    from crack_lightning.commands.predict import run as predict_run
    from crack_lightning.evaluation.crack_maps import tile_probs_from_map

    photos = tmp_path / "photos"
    photo = write_masked_photo(photos, "wall", 120, seed=42)
    (photos / "wall_mask.png").unlink()
    out = tmp_path / "scan"
    cfg = compose_config(
        "predict",
        [
            f"ckpt_path={map_run / 'checkpoints' / 'best.ckpt'}",
            f"inputs=[{photo}]",
            "mode=scan",
            "scan.patch_size=40",
            "scan.stride=20",
            f"paths.output_dir={out}",
            "num_workers=0",
            "progress=false",
        ],
    )
    summary = predict_run(cfg)
    report = Path(summary["photos"][0]["figure"]).parent
    crack_map = np.asarray(Image.open(report / "wall_cracks.png"))
    assert crack_map.shape == (120, 120) and crack_map.dtype == np.uint8
    with (report / "wall_scan.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 25  # 5 x 5 windows of 40 every 20
    boxes = np.array([(int(r["x"]), int(r["y"])) for r in rows])
    probs = np.array([float(r["prob_crack"]) for r in rows])
    derived = tile_probs_from_map(crack_map / 255, boxes, 40, 0.01)
    assert np.allclose(probs, derived, atol=1 / 255)  # the map is stored in 8 bits
    overlay = np.asarray(Image.open(report / "wall_scan.png").convert("RGB"))
    changed = (overlay != np.asarray(Image.open(photo).convert("RGB"))).any(axis=2)
    line = (overlay == LINE_COLOUR).all(axis=2)
    assert np.array_equal(changed, line)  # only the crack line is drawn; the rest is the photo
    assert line.sum() <= max(1, (crack_map >= 128).sum())  # a line, not the crack's area
    with (report / "wall_cracks.csv").open() as handle:
        cracks = list(csv.DictReader(handle))
    entry = summary["photos"][0]
    assert entry["cracks"] == len(cracks)
    lengths = sum(float(row["length_px"]) for row in cracks)
    assert entry["crack_length_px"] == pytest.approx(lengths, abs=0.1 * max(1, len(cracks)))


def test_mm_per_px_must_be_positive(map_run, tmp_path):
    from crack_lightning.commands.predict import run as predict_run
    from crack_lightning.errors import PredictionError

    cfg = compose_config(
        "predict",
        [
            f"ckpt_path={map_run / 'checkpoints' / 'best.ckpt'}",
            f"inputs=[{tmp_path}]",
            "mode=scan",
            "scan.mm_per_px=0",
            f"paths.output_dir={tmp_path / 'out'}",
        ],
    )
    with pytest.raises(
        PredictionError, match=r"^scan\.mm_per_px=0(\.0)? must be a pixel's size in mm > 0\.$"
    ):
        predict_run(cfg)


def test_a_crack_map_checkpoint_cannot_be_exported(map_run, tmp_path):
    from crack_lightning.errors import PredictionError
    from crack_lightning.inference.classifiers import load_classifier

    model = load_classifier(map_run / "checkpoints" / "best.ckpt", "cpu")
    assert model.maps
    with pytest.raises(PredictionError, match=r"is a crack-map model \(model=segmenter\)"):
        model.checkpoint_module  # noqa: B018


def map_adaptation(map_run: Path, tmp_path: Path, photos: int, *overrides: str):
    """experiment=adapt of map_run's checkpoint to a site of `photos` masked photos with a
    board joint beside a fainter crack (tmp_path/site), into tmp_path/adapted."""
    site = tmp_path / "site"
    for i in range(photos):
        write_masked_photo(site, f"s{i}", 96, seed=100 + i, joint=True)
    return compose_config(
        "train",
        [
            "experiment=adapt",
            f"init_from={map_run / 'checkpoints' / 'best.ckpt'}",
            f"data.sources.site.root={site}",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'adapted'}",
            *QUIET,
            "logger=none",
            "adapt.replay=0.5",
            *overrides,
        ],
    )


def test_adapting_a_crack_map_to_a_site_improves_its_unseen_photos(map_run, tmp_path, caplog):
    """experiment=adapt from a crack-map checkpoint adapts it as a crack map; the site's
    validation photos, scanned before and after, score higher after."""
    from crack_lightning.training.run import train

    run = tmp_path / "adapted"
    cfg = map_adaptation(
        map_run,
        tmp_path,
        10,
        "adapt.map_epochs=0",  # the site split as its sources: val chooses
        "trainer.max_epochs=10",
        "callbacks.early_stopping=null",
    )
    with caplog.at_level("INFO"):
        train(cfg)
    said = [r.getMessage() for r in caplog.records]
    split = re.search(
        r"The site's photos: (\d+) train, (\d+) val, 0 test \(by photo", "\n".join(said)
    )
    assert split and int(split[1]) + int(split[2]) == 10 and int(split[2]) >= 1
    table = next(m for m in said if "with the adapted model" in m)
    assert "site_before |" not in table  # only the site is scanned, not replayed sources
    site_row = next(line for line in table.splitlines() if line.startswith("site |"))
    pixel_f1 = site_row.split(" | ")[-1]  # "before -> after"
    before, after = (float(v) for v in pixel_f1.split(" -> "))
    assert after > before + 0.05, table
    assert (run / "scan_eval" / "before").is_dir()
    # the page of overlays, named under the table: a row per validation photo, pixel F1 each
    assert f"per photo: {run / PAGE_NAME}" in table
    rows = page_rows((run / PAGE_NAME).read_text(), "photo")
    assert len(rows) == int(split[2]) and all(c[-1] != "n/a -&gt; n/a" for _, c in rows)
    # the adapted model scans with the site's window: crops of its input size, half overlapping
    from crack_lightning.inference.classifiers import load_classifier

    assert load_classifier(run / "checkpoints" / "best.ckpt", "cpu").window == (48, 24)


def test_adapting_a_crack_map_trains_on_every_photo_and_improves_the_left_out_ones(
    map_run, tmp_path, caplog
):
    """experiment=adapt from a crack-map checkpoint with 5 site photos: all 5 train; each
    photo left out scores higher with a model trained without it than with init_from; the
    chosen epochs are trained and the chosen threshold is stored in the checkpoint."""
    from crack_lightning.inference.classifiers import load_classifier
    from crack_lightning.training.run import train

    run = tmp_path / "adapted"
    cfg = map_adaptation(map_run, tmp_path, 5, "adapt.map_epochs=8")
    with caplog.at_level("INFO"):
        train(cfg)
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "The site's photos: 5 train, 0 val, 0 test (every photo trains" in said
    chosen = re.search(r"chose (\d) of 8 epochs and threshold (0\.\d)", said)
    assert chosen, said
    table = said[said.index("trained without it:") :]
    site_row = next(line for line in table.splitlines() if line.startswith("site |"))
    before, after = (float(v) for v in site_row.split(" | ")[-1].split(" -> "))
    assert after > before + 0.05, table
    page = (run / "before_after.html").read_text()  # each photo's overlays, before and after
    assert all(page.count(f"s{i}.png") >= 1 for i in range(5)) and "<script" not in page
    assert page.count("data:image/jpeg") == 10
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["epoch"] + 1 == int(chosen[1])  # the chosen epochs, the last kept
    assert "(no metric watched; the last one)" in said
    assert load_classifier(run / "checkpoints" / "best.ckpt", "cpu").threshold == float(chosen[2])


@pytest.mark.parametrize("kind", ["masked photos", "marked crops"])
def test_only_a_site_of_masked_photos_is_left_out_photo_by_photo(map_run, tmp_path, kind):
    """A crack map adapting to masked photos leaves each photo out; to a site of marked
    crops (Positive/ and Negative/, one image each) it adapts as a classifier's site."""
    from crack_lightning.training.adapt import prepare_start

    if kind == "masked photos":
        cfg = map_adaptation(map_run, tmp_path, 5)
    else:
        site = tmp_path / "site"
        for label, grey in (("Positive", 60), ("Negative", 200)):
            (site / label).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.full((48, 48, 3), grey + i, np.uint8)).save(
                    site / label / f"c{i}.png"
                )
        cfg = map_adaptation(map_run, tmp_path, 0)
    start = prepare_start(cfg)
    assert start.site == "site"
    assert start.leaves_photos_out == (kind == "masked photos")


def test_a_site_that_no_training_helps_keeps_init_froms_weights_with_its_threshold(
    map_run, tmp_path, caplog, monkeypatch
):
    """Where the left-out photos choose no epoch, the adapted checkpoint is init_from's
    weights with the chosen threshold: an adaptation always leaves best.ckpt."""
    from crack_lightning.inference.classifiers import load_classifier
    from crack_lightning.training import leave_one_out
    from crack_lightning.training.run import train

    real = leave_one_out.choose
    monkeypatch.setattr(
        leave_one_out, "choose", lambda maps, spec, epochs, start: real(maps, spec, 0, start)
    )
    cfg = map_adaptation(map_run, tmp_path, 3, "adapt.map_epochs=1")
    with caplog.at_level("INFO"):
        train(cfg)
    said = "\n".join(r.getMessage() for r in caplog.records)
    chosen = re.search(r"chose 0 of 1 epochs and threshold (0\.\d)", said)
    assert chosen and "keeps init_from's weights" in said, said
    best = tmp_path / "adapted" / "checkpoints" / "best.ckpt"
    adapted = torch.load(best, weights_only=True)["state_dict"]
    start = torch.load(map_run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert adapted.keys() == start.keys()
    assert all(torch.equal(adapted[k], start[k]) for k in start)
    assert load_classifier(best, "cpu").threshold == float(chosen[1])


def test_a_scan_uses_the_models_window_unless_told(map_run, tmp_path, capsys):
    from crack_lightning.commands.predict import run as predict_run
    from crack_lightning.inference.scan import DEFAULT_PATCH, ScanSettings

    photo = write_masked_photo(tmp_path / "photos", "wall", 120, seed=3)
    (tmp_path / "photos" / "wall_mask.png").unlink()
    cfg = compose_config(
        "predict",
        [
            f"ckpt_path={map_run / 'checkpoints' / 'best.ckpt'}",
            f"inputs=[{photo}]",
            "mode=scan",
            f"paths.output_dir={tmp_path / 'scan'}",
            "num_workers=0",
            "progress=false",
        ],
    )
    summary = predict_run(cfg)
    assert "Scanning with 48 px windows every 48 px" in capsys.readouterr().out
    with Path(summary["photos"][0]["figure"]).with_suffix(".csv").open() as handle:
        assert {row["width"] for row in csv.DictReader(handle)} == {"48"}  # the site's tiles
    told = ScanSettings(patch_size=64, stride=None, unfamiliar_limit=None)
    assert told.for_model((48, 48)).patch_size == 64 and told.for_model((48, 48)).stride == 64
    unset = ScanSettings(patch_size=None, stride=None, unfamiliar_limit=None)
    assert (unset.for_model(None).patch_size, unset.for_model(None).stride) == (DEFAULT_PATCH,) * 2
    assert unset.for_model((128, 64)).stride == 64


@pytest.mark.parametrize("empty", [False, True])
def test_a_site_of_crack_tiles_only_splits_by_photo_and_one_without_cracks_is_refused(
    make_cfg, tmp_path, empty
):
    """Crack maps learn from pixels: a masks source whose every tile holds crack (a few
    photos cut into crops of the model's size) still splits by photo; a source whose masks
    are all empty has nothing to learn from: one line naming it."""
    from crack_lightning.errors import DataError
    from crack_lightning.training.run import build

    site = tmp_path / "site"
    for i in range(5):
        write_masked_photo(site, f"s{i}", 64, seed=i)
        if empty:
            Image.new("L", (64, 64)).save(site / f"s{i}_mask.png")
    cfg = make_cfg(
        "model=segmenter",
        "data.targets=masks",
        "+data/sources@data.sources.site=masks",
        f"data.sources.site.root={site}",
        "data.sources.site.tile_size=48",
        "data.sources.site.stride=16",
    )
    datamodule = build(cfg.data)
    if empty:
        with pytest.raises(DataError, match=r"^data\.sources\.site\.root=.* has no crack to learn"):
            datamodule.setup("fit")
        return
    datamodule.setup("fit")
    assert all(label == 1 for _, label in datamodule.samples)
    photos = {
        name: {Path(datamodule.samples[i][0].split("#")[0]).name for i in datamodule.split[name]}
        for name in ("train", "val")
    }
    assert photos["train"] and photos["val"] and not photos["train"] & photos["val"]


@pytest.mark.parametrize(
    ("told", "watched"),
    [
        (["adapt.map_epochs=0"], "val/pixel_f1"),
        (["adapt.map_epochs=0", "callbacks.model_checkpoint.monitor=null"], None),
        ([], "val/pixel_f1"),  # until leaving each photo out chooses the epochs
    ],
)
def test_a_crack_map_adaptation_watches_pixel_f1_unless_told_to_watch_nothing(
    map_run, tmp_path, told, watched
):
    from crack_lightning.errors import ConfigError
    from crack_lightning.inference.classifiers import read_training_checkpoint
    from crack_lightning.settings import settings_of
    from crack_lightning.training.adapt import AdaptSettings, use_map_recipe

    cfg = compose_config(
        "train",
        ["experiment=adapt", f"data.sources.site.root={tmp_path}", *told],
    )
    _, hparams = read_training_checkpoint(
        map_run / "checkpoints" / "best.ckpt", "init_from", ConfigError, ""
    )
    use_map_recipe(cfg, hparams, settings_of(cfg.adapt, AdaptSettings, "adapt"))
    assert cfg.callbacks.model_checkpoint.monitor == watched
    assert cfg.model._target_.endswith("CrackSegmenter") and cfg.data.targets == "masks"
    assert cfg.callbacks.finetune is None and cfg.data.sources.site.tile_size == 48
    assert cfg.model.train_encoder_blocks == cfg.adapt.map_encoder_blocks


def test_the_encoders_last_blocks_train_slower_and_keep_their_statistics(backbone_weights):
    """train_encoder_blocks=2: the encoder's last 2 blocks train, at a tenth of lr, in a
    group of their own; every other encoder weight stays frozen; BatchNorm stays in eval."""
    from crack_lightning.models.segmenter import CrackSegmenter

    cfg = compose_config(
        "train",
        ["model=segmenter", f"model.weights_path={backbone_weights}", "data.targets=masks"],
    ).model
    settings = OmegaConf.to_container(cfg, resolve=True)
    settings = {k: v for k, v in settings.items() if k not in ("_target_", "_recursive_")}
    settings["optimizer"]["lr"] = 0.01
    model = CrackSegmenter(**(settings | {"train_encoder_blocks": 2}))
    features = model.net.unet.encoder.features
    trained = {id(p) for p in features[-2:].parameters()}
    assert all(p.requires_grad for p in features[-2:].parameters())
    assert not any(p.requires_grad for p in features[:-2].parameters())
    groups = model.configure_optimizers()["optimizer"].param_groups
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.001)]
    assert {id(p) for p in groups[1]["params"]} == trained
    assert not trained & {id(p) for p in groups[0]["params"]}
    model.train()
    assert not any(m.training for m in features.modules())  # BatchNorm statistics kept


def test_the_page_draws_a_crack_maps_line_not_a_heat_map(map_run, tmp_path):
    from crack_lightning.inference.classifiers import load_classifier
    from crack_lightning.inference.inspection import Inspector, overlay, rethreshold
    from crack_lightning.inference.scan import ScanSettings, scan_figure

    photo = write_masked_photo(tmp_path / "photos", "wall", 120, seed=5)
    model = load_classifier(map_run / "checkpoints" / "best.ckpt", "cpu")
    inspector = Inspector(model, ScanSettings(None, None, None), 8, 10**6, tmp_path / "labels")
    [inspection], _ = inspector.scan([photo], 0.5, tmp_path / "out")
    drawn = np.asarray(overlay(inspection).convert("RGB"))
    changed = (drawn != np.asarray(Image.open(photo).convert("RGB"))).any(axis=2)
    assert np.array_equal(changed, (drawn == LINE_COLOUR).all(axis=2))
    assert inspector.window.patch_size == 48  # the map's own window
    # a new threshold rewrites the downloadable figure as a crack line too
    rethreshold([inspection], 0.01, tmp_path / "out")
    written = np.asarray(Image.open(scan_figure(tmp_path / "out", inspection.name)).convert("RGB"))
    changed = (written != np.asarray(Image.open(photo).convert("RGB"))).any(axis=2)
    assert changed.any() and np.array_equal(changed, (written == LINE_COLOUR).all(axis=2))


def test_predicting_with_a_crack_map_imports_no_lightning(map_run):
    """As for the classifier: prediction builds the plain-torch network from the checkpoint."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from crack_lightning.inference.classifiers import load_classifier\n"
        f"model = load_classifier({str(map_run / 'checkpoints' / 'best.ckpt')!r}, 'cpu')\n"
        "probs = model.predict(torch.zeros(2, 3, 48, 48, dtype=torch.uint8))\n"
        "assert probs.shape == (2,), probs.shape\n"
        "heavy = ('lightning', 'torchmetrics')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
