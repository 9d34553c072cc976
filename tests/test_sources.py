"""data.sources: several labelled sources, split per source without leaks, with clear errors,
downloaded with their own layout; per-source metrics; the stored decision threshold."""

from __future__ import annotations

import csv
import hashlib
import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from crack_lightning.data.datamodule import balanced_sampler
from crack_lightning.data.feature_cache import cache_wanted
from crack_lightning.data.fetch import ensure_source
from crack_lightning.data.sources import SourceSpec, class_folders, parse_sources, scan_source
from crack_lightning.data.splits import load_sources, write_manifest
from crack_lightning.errors import DataError
from crack_lightning.evaluation.metrics import MEAN, METRICS, per_source_scores
from crack_lightning.evaluation.threshold import choose_threshold
from crack_lightning.training.check import check_train_settings
from crack_lightning.training.run import build, build_callbacks

from .conftest import compose_config


def write_images(folder: Path, names: list[str], shade: int = 0) -> None:
    """Distinct tiny PNG-coded images (a colour from the path's hash)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        digest = hashlib.sha256(f"{folder}/{name}/{shade}".encode()).digest()
        Image.frombytes("RGB", (4, 4), digest[:16] * 3).save(folder / name, quality=100)


def sdnet_like(root: Path, photos: int = 8, crops: int = 6, layout: str = "plain") -> Path:
    """Crops named PHOTO-CROP.jpg; each photo has cracked and uncracked crops."""
    pos, neg = ("D/CD", "D/UD") if layout == "sdnet" else ("Positive", "Negative")
    for p in range(photos):
        write_images(root / pos, [f"70{p:02d}-{c}.jpg" for c in range(crops)], shade=p)
        write_images(root / neg, [f"70{p:02d}-{c + 50}.jpg" for c in range(crops)], shade=p + 9)
    return root


def source(root: Path, name: str = "decks", kind: str = "sdnet2018", **extra) -> dict:
    """A source entry as the shipped config composes it."""
    cfg = compose_config(
        "train",
        [f"+data/sources@data.sources.{name}={kind}", f"data.sources.{name}.root={root}"],
    )
    entry = OmegaConf.to_container(cfg.data.sources[name], resolve=True)
    return entry | extra


def test_crops_of_one_photo_never_straddle_train_and_val(tmp_path):
    root = sdnet_like(tmp_path / "sdnet", photos=10)
    config = {"decks": source(root)}
    for seed in range(5):
        result = load_sources(parse_sources(config), 0.3, 0.0, seed, check=False)
        photo = {
            name: {Path(result.samples[i][0]).name.split("-")[0] for i in result.split[name]}
            for name in ("train", "val")
        }
        assert photo["train"] and photo["val"]
        assert not photo["train"] & photo["val"], f"seed {seed}: a photo on both sides"
        assert sorted(result.split["train"] + result.split["val"]) == list(range(120))
    again = load_sources(parse_sources(config), 0.3, 0.0, 4, check=False)
    assert again.split == result.split  # seeded


def test_each_source_is_split_on_its_own_and_the_manifest_names_it(tmp_path):
    decks = sdnet_like(tmp_path / "sdnet", photos=10)
    bricks = tmp_path / "bricks"
    write_images(bricks / "Positive", [f"{i}.jpg" for i in range(20)])
    write_images(bricks / "Negative", [f"{i}.jpg" for i in range(20)], shade=100)
    config = {"decks": source(decks), "bricks": source(bricks, "bricks", "folder", split="random")}
    result = load_sources(parse_sources(config), 0.25, 0.0, 0, check=True)
    assert result.names == ["decks", "bricks"]
    val = Counter((result.source[i], result.samples[i][1]) for i in result.split["val"])
    assert val[(1, 0)] == val[(1, 1)] == 5  # stratified within the source: 25% of 20
    assert val[(0, 0)] > 0 and val[(0, 1)] > 0
    write_manifest(tmp_path / "manifest.csv", result)
    with (tmp_path / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"source", "path", "label", "split"}
    assert Counter(r["source"] for r in rows) == {"decks": 120, "bricks": 40}
    assert rows[0]["source"] == "bricks" and rows[0]["path"] == "Negative/0.jpg"


def test_sdnet_archive_layout_and_subsets(tmp_path):
    root = sdnet_like(tmp_path / "SDNET2018", layout="sdnet")
    write_images(root / "W" / "CW", ["9-1.jpg", "9-2.jpg"])
    write_images(root / "W" / "UW", ["9-3.jpg"])
    everything = scan_source(SourceSpec.from_config("s", source(root)))
    decks = scan_source(SourceSpec.from_config("s", source(root, subsets=["D"])))
    assert len(everything) == 96 + 3 and len(decks) == 96
    assert all("/D/" in path for path, _ in decks)
    assert Counter(label for _, label in decks) == {0: 48, 1: 48}


def test_bad_sources_get_clear_errors(tmp_path):
    root = sdnet_like(tmp_path / "sdnet")
    with pytest.raises(DataError, match=r"data\.sources\.decks\.root=.*missing.* is not a folder"):
        scan_source(SourceSpec.from_config("decks", source(tmp_path / "missing")))
    spec = SourceSpec.from_config(
        "decks", source(root, classes={"Positive": ["X/CX"], "Negative": ["Negative"]})
    )
    with pytest.raises(DataError, match=r"classes\.Positive=\['X/CX'\] matches no folder"):
        class_folders(spec)
    with pytest.raises(DataError, match="not a known source.*\\+data/sources@data.sources"):
        load_sources(parse_sources({"sdnet": {"root": str(root)}}), 0.3, 0.0, 0, check=False)
    with pytest.raises(DataError, match="does not match the file name"):
        load_sources(
            parse_sources({"d": source(root, group_pattern="^(x+)_")}), 0.3, 0.0, 0, check=False
        )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("group_distance=abc", r"data\.sources\.decks\.group_distance=abc must be an integer\."),
        ("group_distance=40", r"data\.sources\.decks\.group_distance=40 must be an integer in"),
        ("split=blocks", r"data\.sources\.decks\.split=blocks must be one of random, grouped"),
        ("subsets=5", r"data\.sources\.decks\.subsets=5 must be a list"),
        ("classes.Positive=3", r"data\.sources\.decks\.classes=.* must be a mapping"),
        ("group_pattern='(x'", r"data\.sources\.decks\.group_pattern='\(x' is no regex"),
    ],
)
def test_source_settings_are_checked_by_their_schema(make_cfg, tmp_path, setting, message):
    cfg = make_cfg(
        "+data/sources@data.sources.decks=sdnet2018",
        f"data.sources.decks.root={tmp_path}",
        f"data.sources.decks.{setting}",
    )
    with pytest.raises(DataError, match=message):
        build(cfg.data).setup("fit")


def test_a_pattern_split_that_cannot_be_dealt_points_at_the_pattern(tmp_path):
    root = sdnet_like(tmp_path / "sdnet", photos=1)  # one photo: one group, nothing for val
    with pytest.raises(DataError) as info:
        load_sources(parse_sources({"decks": source(root)}), 0.3, 0.0, 0, check=False)
    message = str(info.value)
    assert message.startswith("data.sources.decks: The grouped split left no")
    assert "data.sources.decks.group_pattern" in message and "group_distance" not in message


def test_unknown_source_name_through_train_py_is_a_clear_error(make_cfg, tmp_path):
    cfg = make_cfg(f"+data.sources.mine.root={tmp_path}")
    datamodule = build(cfg.data)
    with pytest.raises(DataError, match="data.sources.mine is not a known source"):
        datamodule.setup("fit")


def test_balanced_sampler_weighs_every_source_and_class_cell_equally():
    labels = [1] * 10 + [0] * 90 + [1] * 50 + [0] * 50
    sources = [0] * 100 + [1] * 100
    sampler = balanced_sampler(labels, sources, 0)
    epochs = [list(sampler) for _ in range(40)]
    assert epochs[0] != epochs[1] and all(len(e) == 200 for e in epochs)
    drawn = Counter((sources[i], labels[i]) for epoch in epochs for i in epoch)
    shares = np.array(list(drawn.values())) / sum(drawn.values())
    assert len(drawn) == 4 and np.allclose(shares, 0.25, atol=0.02)


def test_negative_weights_draw_a_sources_not_crack_cell_that_many_times_as_often():
    labels = [1] * 10 + [0] * 90 + [1] * 50 + [0] * 50
    sources = [0] * 100 + [1] * 100
    sampler = balanced_sampler(labels, sources, 0, {1: 3.0})
    drawn = Counter((sources[i], labels[i]) for _ in range(40) for i in sampler)
    total = sum(drawn.values())
    # weights 1, 1, 1, 3 over the four cells: shares 1/6, 1/6, 1/6, 1/2
    assert abs(drawn[(1, 0)] / total - 0.5) < 0.02
    assert all(abs(drawn[cell] / total - 1 / 6) < 0.02 for cell in [(0, 0), (0, 1), (1, 1)])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.negative_weights={brickwork: 2}"],
            r"^data\.negative_weights weighs cells of the balanced sampler: set "
            r"data\.balanced_sampling=true",
        ),
        (
            ["data.balanced_sampling=true", "data.negative_weights={brickwork: 0}"],
            r"^data\.negative_weights\.brickwork=0\.0 must be above 0\.$",
        ),
        (
            ["data.balanced_sampling=true", "data.negative_weights={brickwrok: 2}"],
            r"^data\.negative_weights names brickwrok, not a source of this run "
            r"\(data\.sources is not set\)\.$",
        ),
    ],
)
def test_negative_weights_are_checked_before_any_file(make_cfg, overrides, message):
    with pytest.raises(DataError, match=message):
        check_train_settings(make_cfg(*overrides))


def test_negative_weights_reach_the_training_sampler(make_cfg, tmp_path):
    root = sdnet_like(tmp_path / "decks", photos=4, crops=3, layout="plain")
    cfg = make_cfg(
        "+data/sources@data.sources.decks=sdnet2018",
        f"data.sources.decks.root={root}",
        "data.balanced_sampling=true",
        "data.negative_weights={decks: 4}",
    )
    check_train_settings(cfg)
    dm = build(cfg.data)
    dm.setup("fit")
    sampler = dm._train_sampler()
    labels = [label for _, label in dm.split_samples("train")]
    weight = dict.fromkeys((0, 1), 0.0)
    for w, label in zip(sampler.weights.tolist(), labels, strict=True):
        weight[label] += w
    assert weight[0] == pytest.approx(4 * weight[1])


def test_sdnet_download_from_a_local_url_keeps_the_layout_and_is_idempotent(tmp_path):
    tree = sdnet_like(tmp_path / "built" / "SDNET2018", photos=2, crops=2, layout="sdnet")
    archive = tmp_path / "SDNET2018.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*.jpg")):
            zf.write(path, path.relative_to(tree.parent).as_posix())
    root = tmp_path / "data" / "sdnet2018"
    download = {"enabled": True, "url": archive.as_uri(), "size": archive.stat().st_size}
    spec = SourceSpec.from_config("sdnet2018", source(root, download=download))
    ensure_source(spec, progress=False)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg")) == sorted(
        p.relative_to(tree).as_posix() for p in tree.rglob("*.jpg")
    )
    assert not (tmp_path / "data" / "sdnet2018.zip").exists()  # deleted after unpacking
    stamp = (root / "D" / "CD").stat().st_mtime_ns
    ensure_source(spec, progress=False)  # nothing to do
    assert (root / "D" / "CD").stat().st_mtime_ns == stamp
    wrong = {**download, "size": 5}
    other = SourceSpec.from_config("x", source(tmp_path / "other", download=wrong))
    with pytest.raises(DataError, match="bytes"):
        ensure_source(other, progress=False)


def test_an_unreachable_source_url_names_the_source_s_own_archive_setting(tmp_path):
    """Offline, a source's download is answered with its own archive setting, not with
    the METU data set's DOI and data.archive."""
    # .invalid never resolves (RFC 2606): what any address does on a machine offline
    download = {"enabled": True, "url": "http://decks.invalid/SDNET2018.zip", "size": 10}
    spec = SourceSpec.from_config("decks", source(tmp_path / "decks", download=download))
    with pytest.raises(DataError) as caught:
        ensure_source(spec, progress=False, retries=3, retry_wait=600)  # no retry offline
    message = str(caught.value)
    assert "looks offline" in message
    assert message.endswith("pass data.sources.decks.download.archive=PATH.")
    assert "5y9wdsg2zt" not in message and "data.archive" not in message


def test_a_source_archive_places_only_its_class_images(tmp_path):
    """Like METU's, a source's archive is unpacked into scratch and only the regular image
    files of its class folders move into the root: nothing else the archive holds."""
    tree = sdnet_like(tmp_path / "built" / "SDNET2018", photos=1, crops=2, layout="sdnet")
    archive = tmp_path / "SDNET2018.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*.jpg")):
            zf.write(path, path.relative_to(tree.parent).as_posix())
        zf.writestr("SDNET2018/.download.json", '{"planted": true}')
        zf.writestr("SDNET2018/D/CD/notes.txt", "not an image")
        zf.writestr("SDNET2018/X/elsewhere.jpg", "not in a class folder")
    root = tmp_path / "data" / "sdnet2018"
    spec = SourceSpec.from_config(
        "decks", source(root, download={"enabled": True, "archive": str(archive)})
    )
    ensure_source(spec, progress=False)
    placed = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert placed == [
        ".download.json",
        "D/CD/7000-0.jpg",
        "D/CD/7000-1.jpg",
        "D/UD/7000-50.jpg",
        "D/UD/7000-51.jpg",
    ]
    assert json.loads((root / ".download.json").read_text())["folders"] == {"0": 1, "1": 1}
    assert archive.exists()  # a local archive is kept


def test_per_source_metrics_match_a_hand_computed_case():
    # source a: 4 cracked (3 found), 4 not (1 false alarm); source b: 2 cracked (both
    # found), 8 not (no false alarm)
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0] + [1, 1] + [0] * 8)
    probs = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.1, 0.1] + [0.9, 0.7] + [0.2] * 8)
    sources = np.array([0] * 8 + [1] * 10)
    scores = per_source_scores(labels, probs, sources, ["a", "b"], 0.5)
    assert scores["a/acc"] == pytest.approx(6 / 8)
    assert scores["a/recall"] == pytest.approx(3 / 4)
    assert scores["a/precision"] == pytest.approx(3 / 4)
    assert scores["a/bal_acc"] == pytest.approx((3 / 4 + 3 / 4) / 2)
    assert scores["a/f1"] == pytest.approx(3 / 4)
    # a's ROC-AUC: of 16 (cracked, not) pairs, the 0.2 crack loses to 0.6 and beats the 0.1s
    assert scores["a/auroc"] == pytest.approx((4 * 4 - 1) / 16)
    assert scores["b/acc"] == scores["b/bal_acc"] == scores["b/auroc"] == 1.0
    assert scores["mean_source/bal_acc"] == pytest.approx((0.75 + 1.0) / 2)
    assert scores["bal_acc"] == pytest.approx((5 / 6 + 11 / 12) / 2)  # pooled
    assert choose_threshold(labels, probs, sources, "recall", 1.0) <= 0.2
    best = choose_threshold(labels, probs, sources, "balanced_accuracy", 1.0)
    tuned = per_source_scores(labels, probs, sources, ["a", "b"], best)
    assert tuned["mean_source/bal_acc"] >= scores["mean_source/bal_acc"]


def test_a_held_out_source_is_tested_whole_and_an_unknown_one_is_refused(tmp_path):
    decks = sdnet_like(tmp_path / "sdnet", photos=10)
    bricks = tmp_path / "bricks"
    write_images(bricks / "Positive", [f"{i}.jpg" for i in range(20)])
    write_images(bricks / "Negative", [f"{i}.jpg" for i in range(20)], shade=100)
    config = {"decks": source(decks), "bricks": source(bricks, "bricks", "folder")}
    result = load_sources(parse_sources(config), 0.25, 0.0, 0, check=False, holdout="bricks")
    tested = {result.source[i] for i in result.split["test"]}
    trained = {result.source[i] for i in result.split["train"] + result.split["val"]}
    assert tested == {1} and trained == {0}
    assert len(result.split["test"]) == 40
    with pytest.raises(DataError, match="data.holdout_source=brick is not one of the sources"):
        load_sources(parse_sources(config), 0.25, 0.0, 0, check=False, holdout="brick")


def test_experiment_configs_compose_with_three_roots(tmp_path):
    """Roots given one by one win over paths.data_dir for those sources; the recipe
    trains its top stages on cached activations and selects checkpoints by a figure the
    run logs (the mean over sources); without fine-tuning it caches pooled features."""
    given = {name: tmp_path / name for name in ("metu", "sdnet2018", "brickwork")}
    common = [f"paths.data_dir={tmp_path / 'D'}", "model.pretrained=false"]
    roots = [f"data.sources.{name}.root={root}" for name, root in given.items()]
    cfg = compose_config("train", ["experiment=generalize", *common, *roots])
    specs = {spec.name: spec.root for spec in build(cfg.data).specs}
    masked = {name: tmp_path / "D" / name for name in ("crackforest", "cracktile", "masonry")}
    assert specs == given | masked
    model = build(cfg.model)
    _, finetune = build_callbacks(cfg.callbacks, tmp_path, model)
    assert finetune.cached_stage(model.net.backbone) is not None
    assert cache_wanted(cfg.data.cache_features, model.hparams.freeze_backbone, True, False, True)
    for monitor in (cfg.callbacks.model_checkpoint, cfg.callbacks.early_stopping):
        stage, mean, metric = monitor.monitor.split("/")
        assert (stage, mean) == ("val", MEAN) and metric in METRICS
    frozen = compose_config("train", ["experiment=generalize", *common, "callbacks.finetune=null"])
    _, none = build_callbacks(frozen.callbacks, tmp_path, build(frozen.model))
    assert none is None
    assert cache_wanted(frozen.data.cache_features, frozen.model.freeze_backbone, False, False)


def test_threshold_tolerance_keeps_the_threshold_near_half_unless_moving_it_pays():
    """One cracked image of 20 sits at 0.3: the best threshold (just under 0.3) finds it,
    gaining 0.025 balanced accuracy (recall 19/20 -> 20/20). A tolerance below that gain moves the
    threshold; one above it keeps 0.5."""
    labels = np.array([1] * 20 + [0] * 20)
    probs = np.array([0.3] + [0.9] * 19 + [0.1] * 20)
    sources = np.zeros(40, dtype=int)
    assert choose_threshold(labels, probs, sources, "balanced_accuracy", 1.0) <= 0.3
    assert choose_threshold(labels, probs, sources, "balanced_accuracy", 1.0, 0.02) <= 0.3
    assert choose_threshold(labels, probs, sources, "balanced_accuracy", 1.0, 0.03) == 0.5
