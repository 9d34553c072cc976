"""One training at a time per run directory; stale locks are taken over; a run directory
holding a run is continued or, said so, replaced, never replaced by accident."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from crack_lightning.cli import USER_ERROR
from crack_lightning.errors import ConfigError, RunDirError
from crack_lightning.training.run import train
from crack_lightning.training.run_lock import (
    LOCK_NAME,
    acquire,
    first_process,
    refuse_replacing,
    release,
)

from .conftest import run_train_py, start_paused_train_py
from .test_resume import FAST


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(run_dir: Path, pid: int, host: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    record = {"pid": pid, "host": host or socket.gethostname(), "since": "earlier"}
    lock.write_text(json.dumps(record))
    return lock


def test_a_live_run_keeps_its_directory(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, sleeper.pid)
        with pytest.raises(
            RunDirError, match=f"in use by another training \\(process {sleeper.pid}"
        ):
            acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = acquire(tmp_path)  # its process is gone now: the lock is stale
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_stale_or_unreadable_lock_is_taken_over_and_released(tmp_path):
    write_lock(tmp_path, dead_pid())
    lock = acquire(tmp_path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release(lock)
    assert not lock.exists()
    lock.write_text("")  # a run killed while writing its lock
    assert json.loads(acquire(tmp_path).read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # no temp files left


def test_a_lock_from_another_machine_is_respected(tmp_path):
    write_lock(tmp_path, dead_pid(), host="another-node")
    with pytest.raises(RunDirError, match=f"delete {tmp_path / LOCK_NAME}"):
        acquire(tmp_path)


def test_only_the_first_process_of_a_run_takes_the_lock():
    assert first_process({})
    assert not first_process({"LOCAL_RANK": "1"})  # Lightning's DDP processes
    assert not first_process({"LOCAL_RANK": "0", "NODE_RANK": "1"})  # other machines
    torchrun = {"RANK": "2", "GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert not first_process({**torchrun, "WORLD_SIZE": "3"})


@pytest.mark.slow
def test_a_second_train_py_in_a_busy_run_dir_is_refused(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    common = [f"data.root={synthetic_root}", f"paths.output_dir={run_dir}", *FAST]
    first = start_paused_train_py(*common, "trainer.max_epochs=2", marker=marker, epoch=1, batch=1)
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    try:
        second = run_train_py(*common, "trainer.max_epochs=1", "model.lr=0.5")
        resume = run_train_py(*common, "trainer.max_epochs=3", "ckpt_path=last")
    finally:
        first.send_signal(signal.SIGTERM)
        output = first.communicate(timeout=120)[0]
    for refused in (second, resume):
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"paths.output_dir={run_dir} is in use by another training" in refused.stderr
        assert "Traceback" not in refused.stderr
    # the first run's settings and logs are its own
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides
    assert "model.lr=0.5" not in yaml.safe_load(overrides)
    assert first.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert not (run_dir / LOCK_NAME).exists()  # released when the first run stopped
    # and once it has stopped, it can be continued
    resumed = run_train_py(*common, "trainer.max_epochs=2", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (run_dir / LOCK_NAME).exists()


# --- a run directory holding a run ------------------------------------------------------------


def manifest_rows(run_dir: Path) -> list[str]:
    return (run_dir / "split_manifest.csv").read_text().splitlines()


def test_a_new_run_in_a_directory_holding_a_run_is_refused_unless_continued_or_replaced(
    synthetic_cfg, tmp_path
):
    run_dir = tmp_path / "run"  # synthetic_cfg's run directory
    train(synthetic_cfg())
    files = ["split_manifest.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt"]
    kept = {name: (run_dir / name).read_bytes() for name in files}

    with pytest.raises(RunDirError) as refused:
        train(synthetic_cfg("data.val_fraction=0.5"))
    message = str(refused.value)
    assert message.startswith(
        f"paths.output_dir={run_dir} holds a run (split_manifest.csv, metrics.json, "
        f"checkpoints/best.ckpt, checkpoints/last.ckpt); a new run there would replace it."
    )
    assert "continue it with ckpt_path=last, or replace it with overwrite=true." in message
    assert {name: (run_dir / name).read_bytes() for name in files} == kept

    with pytest.raises(ConfigError, match="overwrite=true would delete it: pass one of them"):
        train(synthetic_cfg("ckpt_path=last", "overwrite=true"))
    assert {name: (run_dir / name).read_bytes() for name in files} == kept

    train(synthetic_cfg("ckpt_path=last", "trainer.max_epochs=2"))  # continued: allowed
    assert torch.load(run_dir / files[2], weights_only=True)["epoch"] == 1
    assert manifest_rows(run_dir) == kept["split_manifest.csv"].decode().splitlines()

    train(synthetic_cfg("overwrite=true", "data.val_fraction=0.5"))  # replaced
    assert torch.load(run_dir / files[2], weights_only=True)["epoch"] == 0
    rows = manifest_rows(run_dir)
    assert len(rows) == len(kept["split_manifest.csv"].decode().splitlines())
    assert sum(row.endswith(",val") for row in rows) == (len(rows) - 1) // 2
    # nothing of the old run mixes with the new one: one session's curves
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


def fake_run(run_dir: Path) -> dict[Path, bytes]:
    """A run directory as a killed run leaves it after its first epoch (a split manifest,
    last.ckpt, Hydra's config): what a new run there must not touch."""
    files = {
        run_dir / "split_manifest.csv": b"source,path,label,split\n",
        run_dir / "checkpoints" / "last.ckpt": b"the run's last epoch",
        run_dir / ".hydra" / "config.yaml": b"seed: 42\n",
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def error_line(result) -> str:
    assert result.returncode == USER_ERROR, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.mark.slow
def test_train_py_refuses_a_run_or_sweep_directory_holding_runs_before_writing_there(
    synthetic_root, tmp_path
):
    """Refused before Hydra writes its .hydra/ files and log there: the run's own stay."""
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    files = fake_run(run_dir) | fake_run(sweep_dir / "0_model.lr=0.001")
    common = [f"data.root={synthetic_root}", *FAST, "trainer.max_epochs=1"]

    line = error_line(run_train_py(*common, f"paths.output_dir={run_dir}"))
    assert line.startswith(f"error: paths.output_dir={run_dir} holds a run (split_manifest.csv")
    assert line.endswith("or replace it with overwrite=true.")

    sweep = run_train_py("-m", *common, "model.lr=1e-3,1e-4", f"hydra.sweep.dir={sweep_dir}")
    line = error_line(sweep)
    assert line.startswith(
        f"error: hydra.sweep.dir={sweep_dir} holds runs in 1 job folder(s) (0_model.lr=0.001)"
    )
    assert {path: path.read_bytes() for path in files} == files
    assert not (run_dir / "train.log").exists()
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0_model.lr=0.001"]


def test_a_run_that_finished_no_epoch_is_refused_with_nothing_to_continue(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "split_manifest.csv").write_text("source,path,label,split\n")
    with pytest.raises(RunDirError) as refused:
        refuse_replacing(run_dir, None, overwrite=False)
    assert str(refused.value).endswith(
        "It finished no epoch, so there is nothing to continue: choose another "
        "paths.output_dir, or replace it with overwrite=true."
    )
    refuse_replacing(run_dir, None, overwrite=True)  # said to replace it
    refuse_replacing(tmp_path / "new", None, overwrite=False)  # nothing there
