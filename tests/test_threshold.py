"""The decision threshold chosen on validation: stored in the checkpoint, used by predict
(unless threshold= is set); predict mode=eval over several folders: one table."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from crack_lightning.commands.predict import run
from crack_lightning.evaluation.metrics import binary_scores
from crack_lightning.io import load_safely
from crack_lightning.training.run import train

from .conftest import QUIET, SMALL, compose_config


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, synthetic_root) -> Path:
    """One epoch on synthetic data; threshold = highest reaching 100% crack recall."""
    run_dir = tmp_path_factory.mktemp("tuned") / "run"
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={run_dir}",
            f"paths.cache_dir={run_dir.parent / 'cache'}",
            f"data.root={synthetic_root}",
            *SMALL,
            *QUIET,
            "callbacks.source_metrics.threshold_rule=recall",
            "callbacks.source_metrics.target_recall=1.0",
        ],
    )
    train(cfg)
    return run_dir


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def predict(run_dir: Path, tmp_path: Path, *overrides: str) -> list[dict[str, str]]:
    output = tmp_path / "p.csv"
    cfg = compose_config(
        "predict",
        [
            f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
            f"paths.output_dir={tmp_path}",
            f"output={output}",
            "num_workers=0",
            "progress=false",
            *overrides,
        ],
    )
    run(cfg)
    return read_rows(output)


def test_threshold_is_stored_in_the_checkpoint_and_used_by_predict(
    tuned_run, synthetic_root, tmp_path
):
    checkpoint = load_safely(tuned_run / "checkpoints" / "best.ckpt", "ckpt_path", ValueError, "")
    stored = checkpoint["decision_threshold"]
    metrics = json.loads((tuned_run / "metrics.json").read_text())
    assert stored["rule"] == "recall"
    assert stored["threshold"] == pytest.approx(metrics["val/threshold"])
    assert stored["threshold"] != 0.5
    rows = predict(tuned_run, tmp_path, f"inputs=[{synthetic_root}]")
    probs = np.array([float(r["prob_crack"]) for r in rows])
    labels = [r["label"] for r in rows]
    # prob_crack is rounded to 6 places; skip images that close to the threshold
    clear = np.abs(probs - stored["threshold"]) > 1e-5
    expected = np.where(probs >= stored["threshold"], "Positive", "Negative")
    assert (np.array(labels)[clear] == expected[clear]).all()
    assert (expected != np.where(probs >= 0.5, "Positive", "Negative")).any()
    overridden = predict(tuned_run, tmp_path, f"inputs=[{synthetic_root}]", "threshold=0.5")
    assert [r["label"] for r in overridden] == [
        "Positive" if float(r["prob_crack"]) >= 0.5 else "Negative" for r in overridden
    ]


def test_eval_over_several_folders_writes_one_row_each(
    tuned_run, synthetic_root, sample_root, tmp_path
):
    report = tmp_path / "report"
    rows = predict(
        tuned_run,
        tmp_path,
        f"inputs=[{synthetic_root},{sample_root}]",
        "mode=eval",
        f"report_dir={report}",
        "threshold=0.5",
    )
    summary = read_rows(report / "summary.csv")
    assert [r["input"] for r in summary] == [synthetic_root.name, sample_root.name]
    for row, folder in zip(summary, (synthetic_root, sample_root), strict=True):
        mine = [r for r in rows if r["path"].startswith(str(folder) + "/")]
        labels = np.array([r["true_label"] == "Positive" for r in mine], dtype=int)
        probs = np.array([float(r["prob_crack"]) for r in mine])
        expected = binary_scores(labels, probs, 0.5)
        assert int(row["images"]) == len(mine)
        assert float(row["bal_acc"]) == pytest.approx(expected["bal_acc"], abs=1e-4)
        assert float(row["auroc"]) == pytest.approx(expected["auroc"], abs=1e-4)
        assert (report / row["input"] / "metrics.json").is_file()
    markdown = (report / "summary.md").read_text()
    assert markdown.count("\n|") == 4  # header, rule, two folders
    assert any((report / "tensorboard").iterdir())


def test_training_on_two_sources_logs_each_and_their_mean(synthetic_root, tmp_path):
    """Through the Lightning loop: per-source figures in metrics.json, the mean equal to
    the average of the sources, and a manifest naming each image's source."""
    second = tmp_path / "second"
    shutil.copytree(synthetic_root / "Positive", second / "cracked")
    shutil.copytree(synthetic_root / "Negative", second / "sound")
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp_path / 'run'}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "+data/sources@data.sources.first=folder",
            f"data.sources.first.root={synthetic_root}",
            "+data/sources@data.sources.second=folder",
            f"data.sources.second.root={second}",
            "data.image_size=64",
            "data.batch_size=8",
            "data.num_workers=0",
            "data.sources.second.classes.Positive=[cracked]",
            "data.sources.second.classes.Negative=[sound]",
            "data.balanced_sampling=true",
            "model=mobilenetv3_small",
            "model.pretrained=false",
            "trainer.max_epochs=1",
            "callbacks.progress_bar.refresh_rate=0",
        ],
    )
    metrics = train(cfg)
    assert {"val/first/auroc", "val/second/f1", "val/bal_acc"} <= set(metrics)
    mean = (metrics["val/first/bal_acc"] + metrics["val/second/bal_acc"]) / 2
    assert metrics["val/mean_source/bal_acc"] == pytest.approx(mean)
    rows = read_rows(tmp_path / "run" / "split_manifest.csv")
    assert {r["source"] for r in rows} == {"first", "second"}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_models_carry_the_threshold_and_predict_uses_it(
    fmt, tuned_run, synthetic_root, tmp_path
):
    """ONNX metadata and TorchScript extra files carry the stored threshold; predict (and
    scan: the same run()) on the exported file labels with it, as with the checkpoint."""
    from crack_lightning.inference.classifiers import load_classifier
    from crack_lightning.inference.export import export_model

    model = load_classifier(tuned_run / "checkpoints" / "best.ckpt", "cpu")
    assert model.threshold is not None
    path = export_model(model, fmt, tmp_path / f"model.{fmt}")
    assert load_classifier(path, "cpu").threshold == pytest.approx(model.threshold)
    rows = predict(tuned_run, tmp_path, f"inputs=[{synthetic_root}]", f"ckpt_path={path}")
    probs = np.array([float(r["prob_crack"]) for r in rows])
    clear = np.abs(probs - model.threshold) > 1e-5
    expected = np.where(probs >= model.threshold, "Positive", "Negative")
    assert (np.array([r["label"] for r in rows])[clear] == expected[clear]).all()
    assert (expected != np.where(probs >= 0.5, "Positive", "Negative")).any()
