"""Nothing lost: SIGTERM or a crash mid-epoch keeps the last completed epoch's checkpoint,
and `ckpt_path=last` continues in the same run directory without repeated steps."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from crack_lightning.data import datamodule as datamodule_module
from crack_lightning.data.synthetic import generate_dataset
from crack_lightning.errors import ModelConfigError, RunDirError
from crack_lightning.training.resume import latest_run, resume_argv
from crack_lightning.training.run import train

from .conftest import CONF_DIR, QUIET, SMALL, run_train_py, start_paused_train_py
from .damaged import random_bytes_mid_scan

FAST = [
    "data.image_size=64",
    "data.batch_size=8",
    "model=mobilenetv3_small",
    "model.pretrained=false",
    "trainer.log_every_n_steps=1",
    *QUIET,
]


def steps(run_dir: Path, tag: str) -> list[int]:
    """Steps of a scalar as TensorBoard shows them (purged events left out)."""
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def last_ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_curves_continue(run_dir: Path, epochs: int, steps_per_epoch: int) -> None:
    """Every training step once, in order; one validation point per epoch."""
    assert steps(run_dir, "train/loss_step") == list(range(epochs * steps_per_epoch))
    val = steps(run_dir, "val/loss")
    assert len(val) == epochs and val == sorted(set(val))


def test_sigterm_mid_epoch_then_ckpt_path_last_continues_in_the_same_run_dir(
    synthetic_root, tmp_path
):
    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    common = [f"data.root={synthetic_root}", f"paths.output_dir={run_dir}", *FAST]
    first = start_paused_train_py(*common, "trainer.max_epochs=3", marker=marker, epoch=1, batch=2)
    first.send_signal(signal.SIGTERM)  # during epoch 1, after its third batch
    output = first.communicate(timeout=120)[0]

    assert first.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Training stopped (SIGTERMException) during epoch 1" in output
    assert f"ckpt_path=last paths.output_dir={run_dir}" in output
    interrupted = last_ckpt(run_dir)
    steps_per_epoch = interrupted["global_step"]
    assert interrupted["epoch"] == 0 and steps_per_epoch == 5  # 34 images, batches of 8
    assert not (run_dir / "metrics.json").exists()
    # the interrupted epoch logged steps 5..7 before it stopped
    assert max(steps(run_dir, "train/loss_step")) == steps_per_epoch + 2

    second = run_train_py(*common, "trainer.max_epochs=3", "ckpt_path=last")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = last_ckpt(run_dir)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 3 * steps_per_epoch
    assert (run_dir / "metrics.json").is_file()
    assert_curves_continue(run_dir, epochs=3, steps_per_epoch=steps_per_epoch)
    # one TensorBoard run: the second session appended to the same folder
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    # the first session's Hydra files stay; the resumed one's sit beside them
    first_overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert "ckpt_path=last" not in first_overrides
    (resume_dir,) = (run_dir / ".hydra").glob("resume_*")
    assert "ckpt_path=last" in yaml.safe_load((resume_dir / "overrides.yaml").read_text())


def test_a_crash_mid_epoch_keeps_the_last_completed_epoch(synthetic_cfg):
    """last.ckpt follows every epoch, also those that do not improve the best checkpoint
    (Lightning 2.6's save_last alone would not write them)."""
    settings = [
        "trainer.max_epochs=3",
        "trainer.log_every_n_steps=1",
        # epoch 0 stays the best: later epochs never replace best.ckpt
        "callbacks.model_checkpoint.monitor=epoch",
    ]
    crashing = synthetic_cfg(
        *settings,
        "+callbacks.crash._target_=tests.probes.Crash",
        "+callbacks.crash.epoch=2",
        "+callbacks.crash.batch=1",
    )
    run_dir = Path(crashing.paths.output_dir)
    with pytest.raises(RuntimeError, match="crash in the middle of an epoch"):
        train(crashing)
    assert last_ckpt(run_dir)["epoch"] == 1
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == 0
    # epoch 2 logged its first batch (step 10); the crash came before the second was logged
    assert max(steps(run_dir, "train/loss_step")) == 10

    train(synthetic_cfg(*settings, "ckpt_path=last"))
    assert last_ckpt(run_dir)["global_step"] == 15
    assert_curves_continue(run_dir, epochs=3, steps_per_epoch=5)


def test_ckpt_path_last_without_a_checkpoint_says_what_to_do(synthetic_cfg):
    with pytest.raises(ModelConfigError, match=r"ckpt_path=last: .*last.ckpt does not exist"):
        train(synthetic_cfg("ckpt_path=last"))


def make_run(runs_dir: Path, name: str, mtime: float | None) -> Path:
    run = runs_dir / name
    (run / "checkpoints").mkdir(parents=True)
    if mtime is not None:
        (run / "checkpoints" / "last.ckpt").write_bytes(b"")
        os.utime(run / "checkpoints" / "last.ckpt", (mtime, mtime))
    return run


def test_ckpt_path_last_names_the_run_whose_last_checkpoint_is_newest(tmp_path):
    runs = tmp_path / "logs" / "train" / "runs"
    make_run(runs, "2026-01-01_10-00-00_000001", mtime=2000)
    newest = make_run(runs, "2026-01-01_09-00-00_000001", mtime=3000)  # started first
    make_run(runs, "2026-01-02_00-00-00_000001", mtime=None)  # no epoch finished
    assert latest_run(runs) == newest

    argv = resume_argv(
        ["train.py", "ckpt_path=last", f"paths.log_dir={tmp_path / 'logs'}"], CONF_DIR
    )
    assert argv[:3] == ["train.py", "ckpt_path=last", f"paths.log_dir={tmp_path / 'logs'}"]
    assert f"paths.output_dir={newest}" in argv
    assert any(a.startswith("hydra.output_subdir=.hydra/resume_") for a in argv)


def test_ckpt_path_last_keeps_a_named_run_dir_and_leaves_other_commands_alone(tmp_path):
    named = resume_argv(["train.py", "ckpt_path=last", "paths.output_dir=/x/run"], CONF_DIR)
    assert not any(a.startswith("paths.output_dir=") for a in named[3:])
    assert resume_argv(["train.py", "model.lr=0.1"], CONF_DIR) == ["train.py", "model.lr=0.1"]
    swept = resume_argv(["train.py", "-m", "ckpt_path=last", "hydra.sweep.dir=/s"], CONF_DIR)
    assert not any(a.startswith("paths.output_dir=") for a in swept)  # each job's own dir
    with pytest.raises(RunDirError, match=r"no run under .*runs has a checkpoints/last.ckpt"):
        resume_argv(["train.py", "ckpt_path=last", f"paths.log_dir={tmp_path}"], CONF_DIR)


def test_train_py_reports_ckpt_path_last_with_no_run_to_continue(tmp_path):
    result = run_train_py("ckpt_path=last", f"paths.log_dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    assert "error: ckpt_path=last: no run under" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob(".hydra"))  # stopped before Hydra made a run directory


def test_resume_with_other_images_refuses_and_keeps_the_manifest_unless_allowed(make_cfg, tmp_path):
    """Images added after the first session would change the split: ckpt_path=last stops,
    naming them, and leaves split_manifest.csv alone; resume_data_changed=allow goes on and
    keeps the old manifest beside the new one."""
    root = generate_dataset(tmp_path / "data", images_per_class=12, image_size=64, seed=0)
    common = [f"data.root={root}", *SMALL]
    train(make_cfg(*common))
    run_dir = tmp_path / "run"
    manifest = run_dir / "split_manifest.csv"
    before = manifest.read_bytes()
    other = generate_dataset(tmp_path / "other", images_per_class=1, image_size=64, seed=5)
    shutil.copy(next((other / "Positive").iterdir()), root / "Positive" / "added.jpg")

    resume = [*common, "trainer.max_epochs=2", "ckpt_path=last"]
    with pytest.raises(RunDirError) as refused:
        train(make_cfg(*resume))
    message = str(refused.value)
    assert "\n" not in message
    assert "1 image(s) added (e.g. root:Positive/added.jpg)" in message
    assert "resume_data_changed=allow" in message
    assert manifest.read_bytes() == before
    assert last_ckpt(run_dir)["epoch"] == 0

    train(make_cfg(*resume, "resume_data_changed=allow"))
    assert last_ckpt(run_dir)["epoch"] == 1
    assert "Positive/added.jpg" in manifest.read_text()
    (kept,) = run_dir.glob("split_manifest.until_*.csv")
    assert kept.read_bytes() == before


class CacheFilled(Exception):
    """The feature cache was asked to fill: the slow step a refusal must come before."""


@pytest.mark.parametrize("change", ["added", "removed"])
def test_resume_with_other_images_is_refused_before_the_feature_cache_fills(
    make_cfg, tmp_path, monkeypatch, change
):
    """The split is compared with the run's manifest before the feature cache is filled
    (36 s on a small set, minutes on METU): the refusal names the change, and the cache
    is never asked for."""
    root = generate_dataset(tmp_path / "data", images_per_class=12, image_size=64, seed=0)
    common = [f"data.root={root}", *SMALL, "data.cache_features=true"]
    train(make_cfg(*common))
    if change == "added":
        other = generate_dataset(tmp_path / "other", images_per_class=1, image_size=64, seed=5)
        shutil.copy(next((other / "Positive").iterdir()), root / "Positive" / "new.jpg")
        named = "1 image(s) added (e.g. root:Positive/new.jpg)"
    else:
        gone = sorted((root / "Negative").iterdir())[0]
        gone.unlink()
        named = f"1 image(s) removed (e.g. root:Negative/{gone.name})"
    fills = []

    def fill(*args, **kwargs):
        fills.append(args)
        raise CacheFilled

    monkeypatch.setattr(datamodule_module, "cached_features", fill)
    with pytest.raises(RunDirError) as refused:
        train(make_cfg(*common, "trainer.max_epochs=2", "ckpt_path=last"))
    assert named in str(refused.value)
    assert fills == []
    with pytest.raises(CacheFilled):  # allowed: it goes on to fill the cache
        train(
            make_cfg(*common, "trainer.max_epochs=2", "ckpt_path=last", "resume_data_changed=allow")
        )
    assert len(fills) == 1


def test_resume_with_unchanged_data_needs_no_setting(synthetic_cfg, tmp_path):
    train(synthetic_cfg())
    train(synthetic_cfg("trainer.max_epochs=2", "ckpt_path=last", "data.batch_size=4"))
    assert last_ckpt(tmp_path / "run")["epoch"] == 1
    assert not list((tmp_path / "run").glob("split_manifest.until_*"))


def test_resume_after_the_cache_skipped_a_damaged_image_needs_no_setting(make_cfg, tmp_path):
    """The stored manifest leaves out what the feature cache skipped (data.on_bad_image=
    skip); the resumed session compares its split after the same skip, so the same data
    is not taken for changed data."""
    root = generate_dataset(tmp_path / "data", images_per_class=12, image_size=64, seed=0)
    jpeg = next((root / "Positive").iterdir()).read_bytes()
    (root / "Positive" / "damaged.jpg").write_bytes(random_bytes_mid_scan(jpeg))
    common = [f"data.root={root}", *SMALL, "data.cache_features=true"]
    train(make_cfg(*common))
    manifest = tmp_path / "run" / "split_manifest.csv"
    assert "damaged.jpg" not in manifest.read_text()
    train(make_cfg(*common, "trainer.max_epochs=2", "ckpt_path=last"))
    assert last_ckpt(tmp_path / "run")["epoch"] == 1
    assert not list((tmp_path / "run").glob("split_manifest.until_*"))


def test_train_py_resume_with_an_added_source_names_it_before_reading_data(
    synthetic_root, tmp_path
):
    run_dir = tmp_path / "run"
    first = [
        "+data/sources@data.sources.a=folder",
        f"data.sources.a.root={synthetic_root}",
        f"paths.output_dir={run_dir}",
        *FAST,
        "trainer.max_epochs=1",
    ]
    assert run_train_py(*first).returncode == 0
    before = (run_dir / "split_manifest.csv").read_bytes()
    added = ["+data/sources@data.sources.b=folder", f"data.sources.b.root={tmp_path / 'b'}"]
    result = run_train_py(*first, *added, "trainer.max_epochs=2", "ckpt_path=last")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"error: Resuming {run_dir}: the data settings differ" in line
    assert "data.sources.b added" in line
    assert (run_dir / "split_manifest.csv").read_bytes() == before
