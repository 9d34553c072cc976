"""Sweeps that end in an answer: the summary, TensorBoard run names, job folders that never
collide, and the Optuna search."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

from crack_lightning.cli import job_dir_name
from crack_lightning.commands.summarize import main as summarize_main
from crack_lightning.errors import RunDirError
from crack_lightning.training.sweep_summary import write_summary

from .conftest import ROOT, run_train_py

TINY = [
    "data.image_size=64",
    "data.num_workers=0",
    "model.pretrained=false",
    "trainer.max_epochs=1",
    "callbacks.progress_bar.refresh_rate=0",
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as stream:
        return list(csv.DictReader(stream))


def test_a_sweep_ends_with_a_ranked_summary_and_readable_tensorboard_runs(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train_py(
        "-m",
        "model=mobilenetv3_small,resnet18",
        "model.lr=1e-3,3e-4",
        f"data.root={synthetic_root}",
        "data.batch_size=16",
        # rank by validation loss: lower is better
        "optimized_metric=val/loss",
        "optimized_direction=minimize",
        f"hydra.sweep.dir={sweep}",
        *TINY,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    jobs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1", "2", "3"]
    assert jobs[3].name == (
        "3_data.batch_size=16,data.image_size=64,model.lr=0.0003,"
        "model.pretrained=False,model=resnet18,trainer.max_epochs=1"
    )
    losses = {p.name: json.loads((p / "metrics.json").read_text())["val/loss"] for p in jobs}

    rows = read_csv(sweep / "sweep_summary.csv")
    assert [r["job"] for r in rows] == sorted(losses, key=losses.get)
    assert [float(r["val/loss"]) for r in rows] == sorted(losses.values())
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    by_job = {r["job"]: r for r in rows}
    assert by_job[jobs[3].name]["swept"] == "model=resnet18 model.lr=0.0003"
    assert f"data.root={synthetic_root}" in by_job[jobs[0].name]["overrides"]
    # the Markdown table printed at the end, best first
    table = (sweep / "sweep_summary.md").read_text()
    assert table in result.stdout
    best = rows[0]
    assert (
        f"| 1 | {best['job'].split('_')[0]} | {best['swept']} | {float(best['val/loss']):.4f} |"
        in table
    )

    # TensorBoard over the sweep: one run per job, named by its overrides
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(sweep))
    multiplexer.Reload()
    assert sorted(multiplexer.Runs()) == sorted(f"{p.name}/tensorboard" for p in jobs)
    assert all(
        "val/loss" in multiplexer.GetAccumulator(r).Tags()["scalars"] for r in multiplexer.Runs()
    )

    # the command: same table, other metrics on request
    assert summarize_main([f"sweep_dir={sweep}"]) == 0
    assert read_csv(sweep / "sweep_summary.csv") == rows
    assert summarize_main([f"sweep_dir={sweep}", "metric=val/loss", "direction=maximize"]) == 0
    assert [r["job"] for r in read_csv(sweep / "sweep_summary.csv")] == [r["job"] for r in rows][
        ::-1
    ]


def make_job(sweep: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"optimized_metric": "val/acc", "optimized_direction": "maximize"})
    )
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_summary_lists_failed_jobs_last_and_refuses_what_is_not_a_sweep(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    # ROC-AUC of a one-class validation set is undefined: null in metrics.json, n/a here
    figures = {"val/acc": 0.8, "val/auroc": None, "val/loss": 0.5}
    make_job(sweep, "0_model.lr=0.1", ["model.lr=0.1", "seed=1"], figures)
    make_job(sweep, "1_model.lr=0.01", ["model.lr=0.01", "seed=1"], None)  # crashed
    make_job(sweep, "2_model.lr=0.001", ["model.lr=0.001", "seed=1"], {"val/acc": 0.9})
    table = write_summary(sweep)
    rows = read_csv(sweep / "sweep_summary.csv")
    assert [(r["rank"], r["job"], r["val/acc"]) for r in rows] == [
        ("1", "2_model.lr=0.001", "0.9"),
        ("2", "0_model.lr=0.1", "0.8"),
        ("", "1_model.lr=0.01", ""),
    ]
    assert [r["swept"] for r in rows] == ["model.lr=0.001", "model.lr=0.1", "model.lr=0.01"]
    assert "model.lr=0.01 (no metrics.json (failed or unfinished))" in table
    assert "Sweep summary: 3 jobs, best val/acc first (maximize)" in table
    assert "| model.lr=0.1 | 0.8000 | n/a | 0.5000 |" in table

    with pytest.raises(RunDirError, match="holds no job directories"):
        write_summary(sweep / "0_model.lr=0.1")
    with pytest.raises(RunDirError, match="No job has the metric 'val/f1'"):
        write_summary(sweep, "val/f1", "maximize")
    with pytest.raises(RunDirError, match="also pass direction="):
        write_summary(sweep, "val/loss")
    assert summarize_main([f"sweep_dir={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_optuna_search_runs_trials_and_reports_the_best(synthetic_root, tmp_path):
    sweep = tmp_path / "optuna"
    result = run_train_py(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
        "model=choice(mobilenetv3_small)",  # narrow the backbones, for speed
        f"data.root={synthetic_root}",
        "optimized_metric=val/loss",
        "optimized_direction=minimize",
        f"hydra.sweep.dir={sweep}",
        # a study kept in a database (SQLAlchemy 1.4 under optuna 2.x)
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        *TINY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
    assert len(jobs) == 2
    trials, learning_rates = [], []
    for job in jobs:
        overrides = dict(
            o.split("=", 1) for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        )
        config = yaml.safe_load((job / ".hydra/config.yaml").read_text())
        # each job trains with its trial's draws
        assert config["model"]["backbone"] == "mobilenet_v3_small"
        assert config["model"]["lr"] == float(overrides["model.lr"])
        assert config["model"]["dropout"] == float(overrides["model.dropout"])
        assert config["data"]["batch_size"] == int(overrides["data.batch_size"])
        learning_rates.append(float(overrides["model.lr"]))
        trials.append(json.loads((job / "metrics.json").read_text())["val/loss"])
    assert learning_rates[0] != learning_rates[1]  # two draws, not one setting twice
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(trials))
    study = optuna.load_study(
        study_name="crack_lightning", storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    # the study holds each job as a trial: the parameters it trained with, its metric
    recorded = sorted((t.params["model.lr"], t.value) for t in study.trials)
    expected = sorted(zip(learning_rates, trials, strict=True))
    assert [x for pair in recorded for x in pair] == pytest.approx(
        [x for pair in expected for x in pair]
    )
    best_row = read_csv(sweep / "sweep_summary.csv")[0]
    assert float(best_row["val/loss"]) == pytest.approx(min(trials))
    assert f"model.lr={results['best_params']['model.lr']}" in best_row["overrides"]


def test_job_dir_names_say_what_the_job_changed():
    assert job_dir_name(3, "model.lr=0.0003574712922600243,model=resnet18") == (
        "3_model.lr=0.0003575,model=resnet18"
    )
    assert job_dir_name(0, "data/augmentation=none,data.root=/a b/c") == (
        "0_data.augmentation=none,data.root=.ab.c"
    )
    assert job_dir_name(7, "") == "7"
    assert len(job_dir_name(12, "x" * 500)) == len("12_") + 150


def test_runs_started_at_the_same_moment_get_their_own_directories():
    commands = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), "--cfg", "job", "--resolve"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    dirs = [yaml.safe_load(c.communicate(timeout=120)[0])["paths"]["output_dir"] for c in commands]
    assert dirs[0] != dirs[1]
