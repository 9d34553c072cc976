"""One training at a time per run directory; stale locks are taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crack_lightning.errors import RunDirError
from crack_lightning.training.run_lock import LOCK_NAME, acquire, first_process, release

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
