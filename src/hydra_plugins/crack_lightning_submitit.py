"""Sweeps whose jobs run as separate processes: `hydra/launcher=submitit_local` (processes on
this machine) or `submitit_slurm` (SLURM jobs), through hydra-submitit-launcher.

conf/hydra/launcher/ points both at the plugin's launchers with these changes, made here:

- the sweep waits for every job, even after one failed: a failed job (our error, a crash,
  killed, out of time) is one line naming the job and its error (for a crash, the log
  with the traceback), instead of a traceback from the plugin, which stops waiting for
  the rest at the first failure;
- when a job failed, the summary (crack_lightning/training/sweep_summary.py) is written
  before the sweep stops, the failed jobs listed last; otherwise the SweepSummary callback
  writes it after the last job, in this (the submitting) process, as for the basic
  launcher;
- a job with several SLURM tasks (DDP, `tasks_per_node` = GPUs) runs in every task; the
  tasks other than rank 0 keep out of the job's .hydra/ files and log to
  train_rank<rank>.log, as train.py does under srun (training/distributed.py);
- a job's DDP processes on one machine (trainer=ddp under submitit_local) run train.py,
  as in a sweep of the basic launcher, not submitit's command;
- a job SLURM requeues after its time-limit warning (`max_num_timeout` > 0) continues from
  its last.ckpt.

Hydra accepts launchers only from the `hydra_plugins` package and imports every module in
it at start-up (any Hydra command), so this one imports the framework (torch) only where a
job runs or the sweep ends.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from crack_lightning.errors import CrackLightningError

log = logging.getLogger(__name__)

# submitit's exit code after it requeued a job (SIGUSR2 before the time limit)
REQUEUED = -1


class LauncherError(CrackLightningError, CompactHydraException):
    """A job of the sweep failed, or the launcher cannot start; Hydra prints the message
    alone (no traceback) and exits 1."""


def resume_overrides(overrides: Sequence[str], run_dir: Path) -> list[str]:
    """A requeued job's overrides: from its last.ckpt once an epoch has finished, its first
    session's .hydra/ files kept (as ckpt_path=last on train.py's command line); before
    that, started again, replacing what its first session wrote (overwrite=true)."""
    from crack_lightning.training.resume import LAST, LAST_CKPT, resume_output_subdir
    from crack_lightning.training.run_lock import run_files

    if not (run_dir / LAST_CKPT).is_file():
        if not run_files(run_dir):
            return list(overrides)
        return [*(o for o in overrides if not o.startswith("overwrite=")), "overwrite=true"]
    kept = [o for o in overrides if not o.startswith("ckpt_path=")]
    return [*kept, f"ckpt_path={LAST}", resume_output_subdir()]


def failed_return(overrides: Sequence[str], message: str) -> JobReturn:
    """A JobReturn for a job that ended without one of its own."""
    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    ret.return_value = LauncherError(message)
    return ret


def crash_return(ret: JobReturn) -> JobReturn:
    """A crashed job's JobReturn: the traceback into the job's log, one line to return."""
    import submitit

    error = ret._return_value
    traceback.print_exception(error, file=sys.stderr)
    log_file = submitit.JobEnvironment().paths.stderr
    message = f"{type(error).__name__}: {error} (the traceback: {log_file})"
    return failed_return(ret.overrides or [], message)


def last_line(text: str) -> str:
    """The line a failed job's log ends with: our `error: ...` or the exception."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else "no output"


def executor_parameters(cluster: str, params: dict[str, Any]) -> tuple[dict, dict]:
    """The launcher's settings as submitit's (executor arguments, update_parameters), as
    the plugin passes them: shared keys as they are, the others prefixed by cluster."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    init = {"folder": params["submitit_folder"]}
    if "max_num_timeout" in params:
        init[f"{cluster}_max_num_timeout"] = params["max_num_timeout"]
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    update = {
        key if key in shared else f"{cluster}_{key}": value
        for key, value in params.items()
        if key not in ("submitit_folder", "max_num_timeout")
    }
    return init, update


def job_outcome(job: Any, overrides: Sequence[str]) -> JobReturn:
    """A submitit job's JobReturn; one of ours when it ended without (killed, out of time)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return job.results()[0]
    except (UncompletedJobError, FailedJobError):
        return failed_return(
            overrides,
            f"{last_line(job.stderr() or '')} (its log: {job.paths.stderr}, state {job.state})",
        )


try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
except ImportError:  # the `submitit` extra is not installed
    plugin = None

if plugin is not None:

    class _WaitForEveryJob(plugin.BaseSubmititLauncher):
        def setup(self, **kwargs: Any) -> None:
            super().setup(**kwargs)
            # train.py (or crack-train): the command a job's DDP processes run (see __call__)
            self.entry_point = os.path.abspath(sys.argv[0])

        def __call__(
            self,
            sweep_overrides: list[str],
            job_dir_key: str,
            job_num: int,
            job_id: str,
            singleton_state: dict,
        ) -> JobReturn:
            """Run one job, in the job's process (in each of its SLURM tasks)."""
            from crack_lightning.cli import quiet_logs
            from crack_lightning.training.distributed import process_rank, rank_overrides

            quiet_logs()  # as train.py does before Hydra composes the job's config
            # Lightning starts the DDP processes of a job on one machine (trainer=ddp under
            # submitit_local) by running this process's command again: train.py's, not
            # submitit's (`python -m submitit...`); training/distributed.ddp_job adds the
            # job's overrides
            sys.argv = [self.entry_point]
            sys.modules["__main__"].__spec__ = None
            overrides = [*sweep_overrides, *rank_overrides(process_rank())]
            try:
                ret = super().__call__(overrides, job_dir_key, job_num, job_id, singleton_state)
            except SystemExit as stop:  # cli.user_errors: the message went to the job's log
                if stop.code == REQUEUED:  # submitit requeued the job: no result yet
                    raise
                cause = stop.__context__
                return failed_return(
                    sweep_overrides, str(cause) if cause else f"exited with code {stop.code}"
                )
            if ret.status == JobStatus.FAILED:  # a crash: its traceback does not survive pickling
                return crash_return(ret)
            return ret

        def checkpoint(self, sweep_overrides: list[str], *args: Any) -> Any:
            """What SLURM runs again after the time-limit warning (max_num_timeout > 0)."""
            from hydra.core.hydra_config import HydraConfig

            run_dir = Path(HydraConfig.get().runtime.output_dir)
            return super().checkpoint(resume_overrides(sweep_overrides, run_dir), *args)

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            """Submit the jobs and wait for every one (the plugin's launch, but a failed job
            does not stop the waiting)."""
            import submitit

            from crack_lightning.training.sweep_summary import summarize_sweep

            assert self.config is not None
            init, update = executor_parameters(self._EXECUTOR, self.params)
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
            executor.update_parameters(**update)
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
            sweep_dir.mkdir(parents=True, exist_ok=True)
            numbers = list(range(initial_job_idx, initial_job_idx + len(job_overrides)))
            for number, overrides in zip(numbers, job_overrides, strict=True):
                log.info(f"\t#{number} : {' '.join(filter_overrides(overrides))}")
            count = len(numbers)
            jobs = executor.map_array(
                self,
                [list(o) for o in job_overrides],
                ["hydra.sweep.dir"] * count,
                numbers,
                [f"job_id_for_{n}" for n in numbers],
                [plugin.Singleton.get_state()] * count,
            )
            returns = [job_outcome(j, o) for j, o in zip(jobs, job_overrides, strict=True)]
            failed = [
                (number, ret)
                for number, ret in zip(numbers, returns, strict=True)
                if ret.status != JobStatus.COMPLETED
            ]
            for number, ret in failed:
                swept = " ".join(filter_overrides(ret.overrides or []))
                log.error("Sweep job %d (%s) failed: %s", number, swept, ret._return_value)
            if failed:  # the sweeper may stop at the first: summarise what there is
                summarize_sweep(
                    sweep_dir,
                    self.config.get("optimized_metric"),
                    self.config.get("optimized_direction"),
                )
            return returns

    class LocalLauncher(_WaitForEveryJob, plugin.LocalLauncher):
        """`hydra/launcher=submitit_local`: every job a process on this machine, at once."""

    class SlurmLauncher(_WaitForEveryJob, plugin.SlurmLauncher):
        """`hydra/launcher=submitit_slurm`: every job a SLURM job (one job array)."""

else:
    from hydra.plugins.launcher import Launcher

    class _NotInstalled(Launcher):
        def __init__(self, **params: Any) -> None:
            raise LauncherError(
                "hydra/launcher=submitit_local and submitit_slurm need hydra-submitit-launcher, "
                "which is not installed: pip install -e .[submitit] (make setup installs it)."
            )

        def setup(self, **kwargs: Any) -> None:  # never reached: __init__ refuses
            raise NotImplementedError

        def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
            raise NotImplementedError

    class LocalLauncher(_NotInstalled):
        """`hydra/launcher=submitit_local` without the plugin: says what to install."""

    class SlurmLauncher(_NotInstalled):
        """`hydra/launcher=submitit_slurm` without the plugin: says what to install."""
