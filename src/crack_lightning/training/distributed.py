"""One training over several processes (DDP, `trainer=ddp`): which directory each writes to.

Lightning starts the other processes on this machine itself, running train.py again with
`hydra.run.dir=<this run's directory>`, so they all share one run directory. Only rank 0
writes checkpoints, TensorBoard events, the split manifest and metrics.json; each other
process writes only its log, train_ddp_process_<local rank>.log.

Three cases need help, handled here:

- a sweep (`-m`): Lightning would start the whole sweep again in each new process;
  `ddp_job` makes them run the current job only, in the job's directory;
- processes started by torchrun or srun run train.py from the start, each on its own,
  and would each pick their own timestamped run directory: `launch_argv` refuses to
  start unless the command names a directory they all share;
- work before training that the processes can share (the feature cache fill):
  `start_processes` starts them and joins the process group before fit, not in it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from crack_lightning.errors import RunDirError
from crack_lightning.training.resume import MULTIRUN_FLAGS, override_value

# variables torchrun (torch.distributed.run) sets in every process it starts; Lightning's
# TorchElasticEnvironment looks for the same ones
_TORCHRUN_VARS = ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# overrides a job of a sweep should not hand on to its DDP processes (they start sweeps)
_SWEEP_ONLY = ("hparams_search",)
# what Lightning's launcher puts into this process's environment for its DDP processes
_LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def external_processes(env: Mapping[str, str]) -> tuple[str, int]:
    """(launcher, number of processes) when torchrun or SLURM's srun started this one."""
    if all(name in env for name in _TORCHRUN_VARS):
        return "torchrun", int(env.get("WORLD_SIZE", "1"))
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return "srun", int(env["SLURM_NTASKS"])
    return "", 1


def process_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank when torchrun or srun started it (0 otherwise)."""
    env = os.environ if env is None else env
    launcher, _ = external_processes(env)
    if launcher == "torchrun":
        return int(env["RANK"])
    if launcher == "srun":
        return int(env.get("SLURM_PROCID", "0"))
    return 0


def launch_argv(
    argv: Sequence[str], env: Mapping[str, str] | None = None, command: str = "train"
) -> list[str]:
    """train.py's (or predict.py's) command line for a process torchrun or srun started;
    unchanged otherwise.

    Refuses to go on unless the command names a run (or sweep) directory all processes
    share. Processes other than rank 0 keep out of Hydra's .hydra/ files and log to
    <command>_rank<rank>.log, as Lightning's own DDP processes do.
    """
    env = os.environ if env is None else env
    launcher, processes = external_processes(env)
    argv = list(argv)
    if processes <= 1:
        return argv
    args = argv[1:]
    multirun = any(a in MULTIRUN_FLAGS for a in args) or (
        override_value(args, "hydra.mode") == "MULTIRUN"
        or override_value(args, "hparams_search") not in (None, "null")
    )
    if multirun and override_value(args, "hydra.sweep.dir") is None:
        raise RunDirError(
            f"{launcher} started {processes} processes, each running this sweep on its "
            f"own; they must share the sweep directory: add hydra.sweep.dir=DIR (e.g. "
            f"hydra.sweep.dir=logs/train/multiruns/$SLURM_JOB_ID)."
        )
    if not multirun and all(
        override_value(args, k) is None for k in ("paths.output_dir", "hydra.run.dir")
    ):
        raise RunDirError(
            f"{launcher} started {processes} processes, each running {command}.py on its "
            f"own, so each would create its own timestamped run directory. Name one they "
            f"share: add paths.output_dir=DIR, e.g. paths.output_dir=logs/{command}/runs/"
            f"$SLURM_JOB_ID (srun) or paths.output_dir=logs/{command}/runs/$RUN_ID with RUN_ID "
            f"set once for all machines (torchrun)."
        )
    return argv + rank_overrides(process_rank(env), command)


def rank_overrides(rank: int, command: str = "train") -> list[str]:
    """What a process other than rank 0 adds to its overrides: no .hydra/ files (rank 0
    writes them), its own log file."""
    return [] if rank == 0 else ["hydra.output_subdir=null", f"hydra.job.name={command}_rank{rank}"]


@contextmanager
def ddp_job(trainer: object) -> Iterator[None]:
    """Around one sweep job's fit and evaluation: make Lightning's DDP processes run this
    job, in its directory, and let the next job start its own.

    Lightning starts them with this process's command line plus
    `hydra.run.dir=<HydraConfig run.dir>`; in a sweep that command line is the whole
    sweep and run.dir is not the job's directory. So for the job the command line becomes
    its own overrides and run.dir its directory. Afterwards the process group is closed
    and the launcher's environment variables removed, or the next job would wait for
    processes that have finished. Outside sweeps, and for torchrun/srun, nothing changes.
    """
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )
    from omegaconf import read_write

    launcher = getattr(trainer.strategy, "launcher", None)  # type: ignore[attr-defined]
    if (
        not HydraConfig.initialized()
        or HydraConfig.get().mode != RunMode.MULTIRUN
        or not isinstance(launcher, _SubprocessScriptLauncher)
        or launcher.cluster_environment.creates_processes_externally
    ):
        yield
        return
    hydra_cfg = HydraConfig.get()
    overrides = [
        o for o in hydra_cfg.overrides.task if o.lstrip("+~").split("=")[0] not in _SWEEP_ONLY
    ]
    argv, run_dir = sys.argv, hydra_cfg.run.dir
    saved_env = {name: os.environ.get(name) for name in _LAUNCHER_VARS}
    sys.argv = [argv[0], *overrides, "hydra.mode=RUN"]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = run_dir
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_processes(trainer: object) -> None:
    """Start the other DDP processes and join the process group now, before fit, so that
    work before training (the feature cache fill, data/feature_cache.py) is shared out
    among them instead of done by each. Lightning's fit then finds the processes
    started (LOCAL_RANK is set) and the group initialized, and goes on as usual.

    Only for the launchers that start processes running this same command (Lightning's
    for trainer=ddp, torchrun, srun); with one process, or ddp_spawn, nothing changes.
    Called inside ddp_job, so that a sweep's processes run the current job.
    """
    import torch
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    launcher = getattr(trainer.strategy, "launcher", None)  # type: ignore[attr-defined]
    processes = trainer.num_devices * trainer.num_nodes  # type: ignore[attr-defined]
    if (
        processes <= 1
        or not isinstance(launcher, _SubprocessScriptLauncher)
        or torch.distributed.is_initialized()
    ):
        return
    launcher.launch(trainer.strategy.setup_environment)  # type: ignore[attr-defined]
