"""Loggers (conf/logger/): CSV, MLflow in a local store, W&B offline, several at once.

One short training run with `logger=[tensorboard,csv,mlflow]` is read back as a user
would: the CSV table, TensorBoard's events, and the MLflow run through mlflow's own
client (params, every epoch's metrics, the artifacts).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from crack_lightning.errors import ConfigError
from crack_lightning.training.run import train
from tests.conftest import run_train_py

EPOCHS = 2


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, synthetic_root) -> tuple[Path, dict]:
    """A 2-epoch run on tiny synthetic images with three loggers at once."""
    from tests.conftest import QUIET, SMALL, compose_config

    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("loggers")
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp / 'run'}",
            f"paths.cache_dir={tmp / 'cache'}",
            f"data.root={synthetic_root}",
            *QUIET,
            *SMALL,
            f"trainer.max_epochs={EPOCHS}",
            "callbacks.early_stopping=null",
            "logger=[tensorboard,csv,mlflow]",
        ],
    )
    metrics = train(cfg)
    return tmp / "run", metrics


def mlflow_run(run_dir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("crack-lightning")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_records_the_config_as_params(logged_run):
    run_dir, _ = logged_run
    _, run = mlflow_run(run_dir)
    params = run.data.params
    assert run.info.run_name == "run"  # the run directory's name
    assert run.info.status == "FINISHED"
    assert params["model/backbone"] == "mobilenet_v3_small"
    assert params["model/lr"] == "0.001"
    assert params["data/image_size"] == "64"
    assert params["trainer/max_epochs"] == str(EPOCHS)
    assert params["seed"] == "42"


def test_mlflow_records_every_epochs_metrics(logged_run):
    run_dir, metrics = logged_run
    client, run = mlflow_run(run_dir)
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(history) == EPOCHS
    epochs = client.get_metric_history(run.info.run_id, "epoch")
    assert sorted({m.value for m in epochs}) == list(range(EPOCHS))
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == EPOCHS
    # the best checkpoint's figures are one of the epochs' (lowest val/loss)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "val/loss")]
    best = losses.index(min(losses))
    assert metrics["val/loss"] == pytest.approx(min(losses))
    assert metrics["val/acc"] == pytest.approx(sorted(history, key=lambda m: m.step)[best].value)


def test_mlflow_keeps_the_best_checkpoint_figures_and_run_files(logged_run):
    run_dir, _ = logged_run
    client, run = mlflow_run(run_dir)
    run_id = run.info.run_id

    def listing(folder: str) -> list[str]:
        return sorted(a.path for a in client.list_artifacts(run_id, folder))

    assert listing("checkpoints") == ["checkpoints/best.ckpt"]
    assert listing("figures") == [f"figures/epoch_{e:03d}" for e in range(EPOCHS)]
    assert "figures/epoch_001/val_confusion_matrix.png" in listing("figures/epoch_001")
    assert {"run/metrics.json", "run/split_manifest.csv"} <= set(listing("run"))
    local = Path(run.info.artifact_uri.removeprefix("file://"))
    assert local.is_relative_to(run_dir)  # nothing outside the run directory
    kept = local / "checkpoints" / "best.ckpt"
    assert kept.read_bytes() == (run_dir / "checkpoints" / "best.ckpt").read_bytes()
    png = local / "figures" / "epoch_001" / "val_confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((local / "run" / "metrics.json").read_text()) == json.loads(
        (run_dir / "metrics.json").read_text()
    )


def test_csv_and_tensorboard_log_beside_mlflow(logged_run):
    run_dir, metrics = logged_run
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    with (run_dir / "csv" / "metrics.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/acc")]
    assert [int(row["epoch"]) for row in rows] == list(range(EPOCHS))
    best = min(rows, key=lambda row: float(row["val/loss"]))  # what best.ckpt kept
    assert metrics["val/acc"] == pytest.approx(float(best["val/acc"]))


def test_a_logger_whose_package_is_missing_is_named_before_any_data(
    synthetic_cfg, tmp_path, monkeypatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    cfg = synthetic_cfg(f"data.root={tmp_path / 'missing'}", "logger=[tensorboard,mlflow]")
    with pytest.raises(ConfigError, match=r"logger.mlflow needs the `mlflow` package.*\[mlflow\]"):
        train(cfg)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_its_package_is_one_line_naming_pip_install(tmp_path):
    result = run_train_py("logger=wandb", "data=synthetic", f"paths.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: logger.wandb needs the `wandb` package, which is not installed: pip install "
        "wandb; or choose another logger (logger=tensorboard, logger=csv)."
    )
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_wandb_is_offline_in_the_run_directory_by_default(make_cfg):
    cfg = make_cfg("logger=[tensorboard,wandb]")
    assert list(cfg.logger) == ["tensorboard", "wandb"]
    assert cfg.logger.wandb.offline is True
    assert cfg.logger.wandb.save_dir == cfg.paths.output_dir


def test_a_resumed_run_keeps_the_csv_rows_of_its_first_session(synthetic_cfg, tmp_path):
    """CSVLogger deletes the metrics.csv it finds; a resumed session writes its own."""
    train(synthetic_cfg("logger=csv"))
    first = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    train(synthetic_cfg("logger=csv", "ckpt_path=last", "trainer.max_epochs=2"))
    assert (tmp_path / "run" / "csv" / "metrics.csv").read_text() == first
    (resumed,) = (tmp_path / "run" / "csv").glob("resumed_at_step_*/metrics.csv")
    with resumed.open(newline="") as handle:
        epochs = {row["epoch"] for row in csv.DictReader(handle) if row.get("val/acc")}
    assert epochs == {"1"}
