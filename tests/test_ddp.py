"""A real 2-process DDP run on CPU (gloo) through train.py: it trains, keeps the processes'
weights identical (fine-tuned blocks included), gathers metrics, and writes one run
directory with one set of checkpoints and TensorBoard events."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from crack_lightning.errors import RunDirError
from crack_lightning.training.distributed import launch_argv
from crack_lightning.training.run import build

from .conftest import QUIET, compose_config, run_train_py

SETTINGS = [
    "data.image_size=64",
    "data.batch_size=8",
    "model=mobilenetv3_small",
    "model.pretrained=false",
    "trainer.max_epochs=2",
    # the last block joins at epoch 1, after DDP wrapped the model: its gradients are
    # averaged by the fine-tuning callback, not by DDP
    "callbacks/finetune=unfreeze",
    "callbacks.finetune.epoch=1",
    "callbacks.finetune.blocks=1",
    *QUIET,
]
LAST_BLOCK = "net.backbone.features.12."
# two DDP processes on CPU (gloo), started by Lightning
TWO_CPU_PROCESSES = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")


def test_two_process_ddp_run_through_train_py(synthetic_root, tmp_path):
    logs = tmp_path / "logs"
    digests = tmp_path / "digests"
    result = run_train_py(
        *TWO_CPU_PROCESSES,
        f"data.root={synthetic_root}",
        f"paths.log_dir={logs}",
        "+callbacks.digest._target_=tests.probes.ParamDigest",
        f"+callbacks.digest.directory={digests}",
        *SETTINGS,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    # both processes wrote into the one run directory rank 0's Hydra made
    (run_dir,) = (logs / "train" / "runs").iterdir()
    assert sorted(p.name for p in logs.rglob("*") if p.is_dir() and p.parent == logs) == ["train"]
    assert {"train.log", "train_ddp_process_1.log"} <= {p.name for p in run_dir.iterdir()}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == [
        "config.yaml",
        "hydra.yaml",
        "overrides.yaml",
    ]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [2, 5]  # one point per epoch

    # the data was shared out: 34 training images, 17 per process, 3 batches of 8
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 6

    # the processes' weights agree exactly, the fine-tuned block included, and it learned
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["end"] == ranks[1]["end"]
    assert any(n.startswith(LAST_BLOCK) for n in ranks[0]["requires_grad"])
    moved = {n for n in ranks[0]["end"] if ranks[0]["end"][n] != ranks[0]["start"][n]}
    assert any(n.startswith(LAST_BLOCK) for n in moved)
    assert all(n.startswith((LAST_BLOCK, "net.head.")) for n in moved)

    # metrics gathered from both processes: the same as one process on the whole val set
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = compose_config(
        "train",
        [f"data.root={synthetic_root}", f"paths.output_dir={tmp_path / 'check'}", *SETTINGS],
    )
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    model = build(cfg.model)
    single = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (expected,) = single.validate(
        model, datamodule=datamodule, ckpt_path=metrics["best_checkpoint"], weights_only=True
    )
    assert metrics["best_checkpoint"] == str(run_dir / "checkpoints" / "best.ckpt")
    for name in ("val/acc", "val/auroc", "val/f1"):
        assert metrics[name] == expected[name], name
    assert metrics["val/loss"] == pytest.approx(expected["val/loss"], rel=1e-5)


def test_a_ddp_sweep_runs_each_job_once_in_its_own_folder(synthetic_root, tmp_path):
    """Lightning would start the whole sweep again in each DDP process; instead each job's
    second process runs that job only, in the job's folder, and the next job starts anew."""
    logs = tmp_path / "logs"
    result = run_train_py(
        "-m",
        "model.lr=1e-3,3e-4",
        *TWO_CPU_PROCESSES,
        f"data.root={synthetic_root}",
        f"paths.log_dir={logs}",
        *[
            s
            for s in SETTINGS
            if not s.startswith(("trainer.max_epochs", "callbacks/finetune", "callbacks.finetune"))
        ],
        "trainer.max_epochs=1",
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert not (logs / "train" / "runs").exists()
    (sweep,) = (logs / "train" / "multiruns").iterdir()  # one sweep, not one per process
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"]
    for job in jobs:
        files = {p.name for p in job.iterdir()}
        assert {"train.log", "train_ddp_process_1.log", "metrics.json"} <= files
        last = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 3  # 17 images per process, batches of 8
    assert len((sweep / "sweep_summary.csv").read_text().splitlines()) == 3


TORCHRUN_RANK_1 = {
    "RANK": "1",
    "GROUP_RANK": "0",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "WORLD_SIZE": "2",
}


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        (
            {"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0"},
            [],
            r"srun started 4 processes.*add paths.output_dir=DIR",
        ),
        (
            TORCHRUN_RANK_1,
            ["-m", "model.lr=1e-3,1e-4"],
            r"torchrun started 2 processes, each running this sweep.*hydra.sweep.dir=DIR",
        ),
    ],
)
def test_torchrun_or_srun_must_name_a_shared_run_dir(env, args, message):
    with pytest.raises(RunDirError, match=message):
        launch_argv(["train.py", *args], env)
    named = "hydra.sweep.dir=/shared/sweep" if "-m" in args else "paths.output_dir=/shared/run"
    argv = launch_argv(["train.py", *args, named], env)  # fine once named
    assert argv[: len(args) + 2] == ["train.py", *args, named]
    assert launch_argv(["train.py", *args], {}) == ["train.py", *args]  # one process: as is


def test_ranks_after_0_keep_out_of_hydra_files_and_log_apart():
    argv = launch_argv(["train.py", "paths.output_dir=/shared/run"], TORCHRUN_RANK_1)
    assert argv[2:] == ["hydra.output_subdir=null", "hydra.job.name=train_rank1"]
    rank0 = {**TORCHRUN_RANK_1, "RANK": "0", "LOCAL_RANK": "0"}
    assert launch_argv(["train.py", "paths.output_dir=/shared/run"], rank0) == [
        "train.py",
        "paths.output_dir=/shared/run",
    ]
