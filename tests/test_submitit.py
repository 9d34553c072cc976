"""Sweeps whose jobs run as other processes (hydra/launcher=submitit_local / submitit_slurm):
real separate processes, the summary at the end, failed jobs as one line each, and the
SLURM settings as the sbatch script submitit would submit (no SLURM needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from crack_lightning.training.distributed import rank_overrides
from crack_lightning.training.resume import LAST_CKPT

from .conftest import CONF_DIR, ROOT, run_train_py
from .test_sweeps import TINY, read_csv

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
launchers = pytest.importorskip("hydra_plugins.crack_lightning_submitit")

# test_sweeps' tiny settings, with the smallest backbone
FAST = [*TINY, "data.batch_size=16", "model=mobilenetv3_small"]


def test_a_submitit_local_sweep_runs_its_jobs_as_processes_and_summarises(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hydra/launcher=submitit_local",
        "model.lr=1e-3,3e-4",
        f"data.root={synthetic_root}",
        f"hydra.sweep.dir={sweep}",
        "+callbacks.pid._target_=tests.probes.RecordPid",
        *FAST,
    ]
    parent = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stdout, stderr = parent.communicate(timeout=600)
    assert parent.returncode == 0, stderr[-3000:]
    assert "validated against ConfigStore" not in stderr

    jobs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"]
    pids = [json.loads((job / "pid.json").read_text())["pid"] for job in jobs]
    # two processes, neither the one that started the sweep
    assert len(set(pids)) == 2 and parent.pid not in pids
    # submitit's own logs stay inside the sweep directory
    assert len(list(sweep.glob(".submitit/*/*_0_log.out"))) == 2

    # the summary: written once both jobs ended, by the process that waited for them
    losses = {job.name: json.loads((job / "metrics.json").read_text())["val/loss"] for job in jobs}
    rows = read_csv(sweep / "sweep_summary.csv")
    assert sorted(r["job"] for r in rows) == sorted(losses)
    assert {r["job"]: float(r["val/loss"]) for r in rows} == losses
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert sorted(r["swept"] for r in rows) == ["model.lr=0.0003", "model.lr=0.001"]
    assert (sweep / "sweep_summary.md").read_text() in stdout


def test_failed_jobs_are_one_line_each_and_the_summary_lists_them(synthetic_root, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_train_py(
        "-m",
        "hydra/launcher=submitit_local",
        f"data.root={synthetic_root}",
        f"hydra.sweep.dir={sweep}",
        *FAST,
        # job 0 stops at the settings check, job 1 crashes at its first batch
        "data.batch_size=-3,16",
        "+callbacks.crash._target_=tests.probes.Crash",
        "+callbacks.crash.epoch=0",
        "+callbacks.crash.batch=0",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "failed: data.batch_size=-3 must be an integer >= 1." in result.stdout
    crash = "RuntimeError: crash in the middle of an epoch (tests.probes.Crash)"
    line = next(line for line in result.stdout.splitlines() if "Sweep job 1 (" in line)
    assert f"failed: {crash} (the traceback: " in line
    log_file = Path(line.rsplit("(the traceback: ", 1)[1].rstrip(")"))
    assert log_file.parent.parent == sweep / ".submitit"
    assert "Traceback (most recent call last)" in log_file.read_text()
    # the sweeper stops at the first failed job: its message, alone, ends the output
    assert result.stderr.rstrip().endswith(
        "data.batch_size=-3 must be an integer >= 1.\n\n"
        "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."
    )
    rows = read_csv(sweep / "sweep_summary.csv")
    assert [(r["rank"], r["swept"], r["status"]) for r in rows] == [
        ("", "data.batch_size=-3", "no metrics.json (failed or unfinished)"),
        ("", "data.batch_size=16", "no metrics.json (failed or unfinished)"),
    ]


def slurm_launcher_config(*overrides: str) -> dict:
    """hydra.launcher of `train.py -m hydra/launcher=submitit_slurm OVERRIDES`, resolved."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=submitit_slurm", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)  # ${hydra.job.name} and the sweep dir resolve
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_slurm_settings_become_the_sbatch_script_of_a_ddp_job(tmp_path, monkeypatch):
    params = slurm_launcher_config(
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.tasks_per_node=4",
        "hydra.launcher.timeout_min=600",
        "hydra.launcher.mem_gb=64",
        "trainer=ddp",
        "trainer.devices=4",
    )
    launcher = instantiate(params)  # as Hydra makes the launcher
    assert isinstance(launcher, launchers.SlurmLauncher)
    init, update = launchers.executor_parameters("slurm", launcher.params)
    # submitit checks that srun exists; this machine has no SLURM
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    import submitit

    executor = submitit.AutoExecutor(cluster="slurm", **init)
    executor.update_parameters(**update)
    script = executor._executor._make_submission_file_text("python -m job", "uid")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --nodes=1",
        "#SBATCH --time=600",
        "#SBATCH --mem=64GB",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --job-name=train",
        f"#SBATCH --output={tmp_path / 'sweep' / '.submitit' / '%j' / '%j_0_log.out'}",
    ):
        assert line in script.splitlines(), script


def test_extra_tasks_of_a_job_and_requeued_jobs_get_their_overrides(tmp_path):
    assert rank_overrides(0) == []
    assert rank_overrides(3) == [
        "hydra.output_subdir=null",
        "hydra.job.name=train_rank3",
    ]
    # requeued before its first epoch ended: starts again; afterwards: from its last.ckpt
    overrides = ["model.lr=0.001", "ckpt_path=/old/best.ckpt"]
    assert launchers.resume_overrides(overrides, tmp_path) == overrides
    (tmp_path / "split_manifest.csv").write_text("source,path,label,split\n")
    assert launchers.resume_overrides(overrides, tmp_path) == [*overrides, "overwrite=true"]
    (tmp_path / LAST_CKPT).parent.mkdir()
    (tmp_path / LAST_CKPT).write_bytes(b"")
    resumed = launchers.resume_overrides(overrides, tmp_path)
    assert resumed[:2] == ["model.lr=0.001", "ckpt_path=last"]
    assert resumed[2].startswith("hydra.output_subdir=.hydra/resume_")
