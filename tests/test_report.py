"""What people look at: the eval report page, the worst validation images in TensorBoard,
and the suspect labels (confident learning), from predict.py mode=eval and from training."""

from __future__ import annotations

import base64
import csv
import re
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from crack_lightning.commands.predict import run as predict
from crack_lightning.data.synthetic import generate_dataset
from crack_lightning.errors import ConfigError, PredictionError
from crack_lightning.evaluation.metrics import binary_metrics
from crack_lightning.evaluation.report import EvalRun, first_source, write_review
from crack_lightning.evaluation.suspects import (
    grouped_suspects,
    label_quality,
    suspect_labels,
    worst_mistakes,
)
from crack_lightning.training.check import check_train_settings
from crack_lightning.training.run import train

from .conftest import compose_config


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def noisy_scores(seed: int = 0, n: int = 200, flipped: int = 6) -> tuple[np.ndarray, ...]:
    """A model that is right and sure about all but `flipped` images, whose labels were
    flipped after scoring: those are the label errors, the first of them the surest."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    probs = np.where(labels == 1, rng.uniform(0.75, 0.99, n), rng.uniform(0.01, 0.25, n))
    errors = rng.choice(n, flipped, replace=False)
    sure = np.linspace(0.98, 0.97, flipped)  # P(true label): the model knows better
    probs[errors] = np.where(labels[errors] == 1, sure, 1 - sure)
    labels[errors] = 1 - labels[errors]  # now P(given label) is at most 0.03
    return labels, probs, errors


# --- the ranking ---------------------------------------------------------------------------


def test_worst_mistakes_are_the_wrong_decisions_surest_first():
    labels = np.array([0, 0, 1, 1, 0, 1])
    probs = np.array([0.9, 0.2, 0.1, 0.6, 0.55, 0.45])
    # wrong at 0.5: 0 (P(given)=0.1), 2 (0.1), 4 (0.45), 5 (0.45); ties keep file order
    assert worst_mistakes(labels, probs, 0.5, 10).tolist() == [0, 2, 4, 5]
    assert worst_mistakes(labels, probs, 0.5, 2).tolist() == [0, 2]
    assert worst_mistakes(labels, probs, 0.5, 0).tolist() == []
    # at 0.95 all are called sound: the positives are wrong, P(crack) 0.1, 0.45, 0.6
    assert worst_mistakes(labels, probs, 0.95, 10).tolist() == [2, 5, 3]
    np.testing.assert_allclose(label_quality(labels, probs), [0.1, 0.8, 0.1, 0.6, 0.45, 0.45])


def test_confident_learning_finds_the_flipped_labels_and_ranks_them():
    labels, probs, errors = noisy_scores()
    found, quality = suspect_labels(labels, probs)
    assert set(found.tolist()) == set(errors.tolist())  # all of them and nothing else
    # the most confident disagreement first: P(given label) 0.02, 0.022, ... 0.03
    np.testing.assert_allclose(quality[found], np.linspace(0.02, 0.03, 6))


def test_suspects_are_found_within_each_source():
    """A second, less sure source: its per-class thresholds are its own, so its flipped
    labels are found, and its correct-but-unsure ones are not taken for errors."""
    labels_a, probs_a, errors_a = noisy_scores(seed=1)
    labels_b, probs_b, errors_b = noisy_scores(seed=2, n=100, flipped=4)
    probs_b = 0.3 + 0.4 * probs_b  # P(given label) of its clean images: 0.6 .. 0.7
    labels = np.r_[labels_a, labels_b]
    probs = np.r_[probs_a, probs_b]
    source = np.r_[np.zeros(200, int), np.ones(100, int)]
    found, quality = grouped_suspects(labels, probs, source)
    assert set(found.tolist()) == {*errors_a.tolist(), *(errors_b + 200).tolist()}
    assert np.all(np.diff(quality[found]) >= 0)


def test_a_source_of_one_class_gets_the_suspects_of_all_images():
    """inputs=[.../Negative, .../Positive]: each source holds one class."""
    labels, probs, errors = noisy_scores(seed=3)
    found, _ = grouped_suspects(labels, probs, labels)  # the source is the class folder
    assert set(found.tolist()) == set(errors.tolist())
    negative = labels == 0
    assert suspect_labels(labels[negative], probs[negative])[0].tolist() == []  # no reference


def test_first_source_of_overlapping_inputs():
    assert first_source(5, [("a", [0, 1, 2]), ("b", [2, 3])]).tolist() == [0, 0, 0, 1, -1]


# --- the eval page -------------------------------------------------------------------------


def tiny_folder(root: Path, labels: np.ndarray, colours: list[tuple[int, int, int]]) -> list[Path]:
    """One 24 px PNG per label, each its own colour, in Positive/ or Negative/."""
    paths = []
    for number, (label, colour) in enumerate(zip(labels, colours, strict=True)):
        path = root / ("Positive" if label else "Negative") / f"img_{number:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), colour).save(path)
        paths.append(path)
    return paths


def inlined_images(page: str) -> list[Image.Image]:
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [Image.open(BytesIO(base64.b64decode(data))) for data in found]


def test_report_page_is_offline_and_holds_every_figure_and_the_worst_mistakes(tmp_path):
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    probs = np.where(labels == 1, rng.uniform(0.6, 0.9, 20), rng.uniform(0.1, 0.4, 20))
    probs[[0, 1]] = [0.97, 0.7]  # Negative in source a, called crack: 0 is the worse
    probs[[15]] = [0.05]  # Positive in source b, called sound
    colours = [(10 * i, 255 - 10 * i, 100) for i in range(20)]
    a = tiny_folder(tmp_path / "a", labels[[*range(5), *range(10, 15)]], colours[:10])
    b = tiny_folder(tmp_path / "b", labels[[*range(5, 10), *range(15, 20)]], colours[10:])
    # images in index order: a's negatives, b's negatives, a's positives, b's positives
    paths = [*a[:5], *b[:5], *a[5:], *b[5:]]
    groups = [("a", [*range(5), *range(10, 15)]), ("b", [*range(5, 10), *range(15, 20)])]
    scored = EvalRun(paths, labels, probs, 0.5, groups, "model.ckpt")

    written, suspects = write_review(tmp_path / "out", scored, True, worst=2, shown=8)
    page = (tmp_path / "out" / "report.html").read_text()
    assert {p.name for p in written} == {"suspect_labels.csv", "suspect_labels.png", "report.html"}

    assert "<script" not in page and "http" not in page  # nothing fetched: opens offline
    # 3 figures for all images and for each source, 2 + 1 mistakes, the suspects
    images = inlined_images(page)
    assert len(images) == 9 + 3 + suspects
    assert [im.size for im in images[:3]] == [(420, 380)] * 3
    for name, members in [("all", list(range(20))), *groups]:
        metrics = binary_metrics(labels[members], probs[members], 0.5)
        row = f"<td>{name}</td><td>{len(members)}</td><td>{int(labels[members].sum())}</td>"
        assert row + f"<td>{metrics['accuracy']:.4f}</td>" in page
    mistakes_a = page.split("Worst mistakes: a")[1].split("Worst mistakes: b")[0]
    assert mistakes_a.index(str(paths[0])) < mistakes_a.index(str(paths[1]))
    thumbnail = inlined_images(mistakes_a)[0]  # the picture of image 0, shrunk
    assert thumbnail.size == (128, 128)
    assert thumbnail.convert("RGB").getpixel((64, 64)) == colours[0]
    assert str(paths[15]) in page.split("Worst mistakes: b")[1]

    rows = read_csv(tmp_path / "out" / "suspect_labels.csv")
    assert len(rows) == suspects >= 1
    assert rows[0]["path"] == str(paths[0]) and rows[0]["source"] == "a"
    assert rows[0]["given_label"] == "Negative" and float(rows[0]["quality"]) == pytest.approx(0.03)


# --- end to end: training, then predict mode=eval --------------------------------------------


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report")
    return tuple(
        generate_dataset(root / name, images_per_class=10, image_size=48, seed=seed)
        for seed, name in enumerate(("site_a", "site_b"))
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, two_sources) -> Path:
    """2 epochs on two sources with cached features of a random frozen backbone: many
    mistakes, each epoch."""
    run_dir = tmp_path_factory.mktemp("report_run") / "run"
    overrides = [f"paths.output_dir={run_dir}", f"paths.cache_dir={run_dir.parent / 'cache'}"]
    for name, root in zip(("site_a", "site_b"), two_sources, strict=True):
        overrides += [
            f"+data/sources@data.sources.{name}=folder",
            f"data.sources.{name}.root={root}",
        ]
    cfg = compose_config(
        "train",
        [
            *overrides,
            "data.image_size=48",
            "data.batch_size=8",
            "data.val_fraction=0.5",
            "data.num_workers=0",
            "data.cache_features=true",
            "model=mobilenetv3_small",
            "model.pretrained=false",
            "trainer.max_epochs=2",
            "callbacks.progress_bar.refresh_rate=0",
            "callbacks.validation_mistakes.worst_per_source=3",
        ],
    )
    train(cfg)
    return run_dir


def test_training_shows_the_worst_validation_images_per_source(trained):
    events = EventAccumulator(str(trained / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {"val/worst/site_a", "val/worst/site_b"} <= tags
    for tag in ("val/worst/site_a", "val/worst/site_b"):
        shown = events.Images(tag)
        assert len(shown) == 2  # one per epoch, none for the sanity check
        grid = Image.open(BytesIO(shown[-1].encoded_image_string))
        assert grid.width >= 3 * 100  # a row of 3 thumbnails


def test_training_writes_the_validation_split_suspect_labels(trained, two_sources):
    rows = read_csv(trained / "suspect_labels.csv")
    assert rows
    manifest = {(r["source"], r["path"]): r for r in read_csv(trained / "split_manifest.csv")}
    roots = dict(zip(("site_a", "site_b"), two_sources, strict=True))
    for row in rows:  # the manifest names files from their source's root
        relative = Path(row["path"]).relative_to(roots[row["source"]]).as_posix()
        entry = manifest[(row["source"], relative)]
        assert entry["split"] == "val" and entry["label"] == row["given_label"]
    quality = [float(r["quality"]) for r in rows]
    assert quality == sorted(quality) and all(q < 0.5 for q in quality)
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))


def test_predict_eval_writes_the_page_and_suspects_per_input(trained, two_sources, tmp_path):
    report = tmp_path / "report"
    summary = predict(
        compose_config(
            "predict",
            [
                f"ckpt_path={trained / 'checkpoints' / 'best.ckpt'}",
                f"inputs=[{two_sources[0]},{two_sources[1]}]",
                "mode=eval",
                f"output={tmp_path / 'preds.csv'}",
                f"report_dir={report}",
                "num_workers=0",
                "progress=false",
                "worst_per_source=4",
            ],
        )
    )
    page = (report / "report.html").read_text()
    assert "Worst mistakes: site_a" in page and "Worst mistakes: site_b" in page
    predictions = {r["path"]: r for r in read_csv(tmp_path / "preds.csv")}
    wrong = [r for r in predictions.values() if r["label"] != r["true_label"]]
    shown = min(4, sum(str(two_sources[0]) in r["path"] for r in wrong))
    section = page.split("Worst mistakes: site_a")[1].split("<h2>")[0]
    assert len(inlined_images(section)) == shown
    suspects = read_csv(report / "suspect_labels.csv")
    assert summary["suspect_labels"] == len(suspects)
    for row in suspects:
        assert float(row["prob_crack"]) == pytest.approx(
            float(predictions[row["path"]]["prob_crack"])
        )
        assert row["source"] == ("site_a" if str(two_sources[0]) in row["path"] else "site_b")
    # training's suspects came from the kept model's epoch: best.ckpt gives their P(crack)
    for row in read_csv(trained / "suspect_labels.csv"):
        assert float(row["prob_crack"]) == pytest.approx(
            float(predictions[row["path"]]["prob_crack"]), abs=1e-4
        )


def test_bad_report_settings_are_one_line_errors(make_cfg, tmp_path):
    with pytest.raises(PredictionError, match=r"^worst_per_source=-1 must be an integer >= 0"):
        predict(
            compose_config("predict", ["ckpt_path=x.ckpt", "inputs=[x]", "worst_per_source=-1"])
        )
    with pytest.raises(
        ConfigError, match=r"^callbacks\.validation_mistakes\.suspects_shown=-2 must be"
    ):
        check_train_settings(make_cfg("callbacks.validation_mistakes.suspects_shown=-2"))


# --- the callback's choices, on a hand-made epoch ---------------------------------------------


class FakeData:
    """Two sources, six validation images in loader order."""

    def split_sources(self, name):
        return ["a", "b"], [0, 0, 0, 1, 1, 1]

    def split_samples(self, name):
        return [(f"img{i}.png", 0) for i in range(6)]


def test_the_grid_of_each_source_shows_its_most_confident_mistakes(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import TensorBoardLogger

    from crack_lightning.training import validation

    shown = []

    def grid(rows, columns):
        shown.append([row["path"] for row in rows])
        return Figure(figsize=(1, 1))

    monkeypatch.setattr(validation, "mistake_grid", grid)
    callback = validation.ValidationMistakes(2, True, 4, 0.5, str(tmp_path))
    callback.labels = np.array([0, 0, 1, 1, 0, 1])
    callback.positions = np.array([5, 4, 3, 2, 1, 0])  # a sampler's order: image i is 5 - i
    trainer = SimpleNamespace(
        loggers=[TensorBoardLogger(str(tmp_path))],
        is_global_zero=True,
        datamodule=FakeData(),
        global_step=7,
        current_epoch=0,
    )
    callback.log_worst(trainer, np.array([0.6, 0.9, 0.45, 0.2, 0.7, 0.1]))
    # source a = predictions 3, 4, 5 (images 2, 1, 0), all wrong: P(given label) 0.2, 0.3,
    # 0.1; source b = predictions 0, 1, 2 (images 5, 4, 3): 0.4, 0.1, 0.45
    assert shown == [["img0.png", "img2.png"], ["img4.png", "img5.png"]]
    trainer.loggers[0].experiment.flush()
    events = EventAccumulator(trainer.loggers[0].log_dir)
    events.Reload()
    assert set(events.Tags()["images"]) == {"val/worst/a", "val/worst/b"}


def test_suspects_come_from_the_best_checkpoints_epoch():
    from crack_lightning.training.validation import ValidationMistakes

    callback = ValidationMistakes(0, True, 0, 0.5, "unused")
    callback.epochs = {0: (np.zeros(1), 0.7), 1: (np.zeros(1), 0.5), 2: (np.zeros(1), 0.6)}
    best = SimpleNamespace(monitor="val/loss", best_model_score=torch.tensor(0.5))
    assert callback.chosen_epoch(SimpleNamespace(checkpoint_callback=best)) == 1
    earlier = SimpleNamespace(monitor="val/loss", best_model_score=torch.tensor(0.4))
    assert callback.chosen_epoch(SimpleNamespace(checkpoint_callback=earlier)) == 2  # the last
    assert callback.chosen_epoch(SimpleNamespace(checkpoint_callback=None)) == 2


def test_predictions_are_matched_to_the_images_the_sampler_gave():
    """Under DDP process 0 gets every second image: per-source figures and the pictures
    follow its sampler, not the split's first images."""
    from torch.utils.data import DataLoader, DistributedSampler

    from crack_lightning.training.validation import loader_positions

    images = list(range(10))
    shared = DistributedSampler(images, num_replicas=2, rank=0, shuffle=False)
    trainer = SimpleNamespace(val_dataloaders=DataLoader(images, sampler=shared))
    assert loader_positions(trainer, "val", 5).tolist() == [0, 2, 4, 6, 8]
    assert loader_positions(trainer, "val", 2).tolist() == [0, 2]  # limit_val_batches
    trainer = SimpleNamespace(test_dataloaders=[DataLoader(images)])
    assert loader_positions(trainer, "test", 10).tolist() == images
