"""Resuming runs: `ckpt_path=last`, TensorBoard curves that continue, and what to do after
an interruption.

`ckpt_path=last` is checkpoints/last.ckpt of the run directory the job writes into:

- a run directory named on the command line (`paths.output_dir=RUN` or `hydra.run.dir=RUN`):
  that one;
- nothing named, a single run: train.py names the run under <paths.log_dir>/<task_name>/runs/
  whose last.ckpt was written most recently, before Hydra starts, so that Hydra's own
  files (train.log, .hydra/) continue there as well;
- a sweep (`-m`): each job's own directory, so pass the interrupted sweep's
  `hydra.sweep.dir=SWEEP`; its jobs get the same numbers and folders again.

The first session's .hydra/ files are kept; a resumed session writes its own into
.hydra/resume_<date_time>/.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from crack_lightning.errors import ModelConfigError, RunDirError
from crack_lightning.io import load_safely

log = logging.getLogger(__name__)

RESUME_HINT = (
    "To resume, pass a run's checkpoints/last.ckpt (or best.ckpt) written by train.py, "
    "or ckpt_path=last."
)
LAST = "last"
LAST_CKPT = Path("checkpoints") / "last.ckpt"
MULTIRUN_FLAGS = ("-m", "--multirun")


def override_value(args: Sequence[str], key: str) -> str | None:
    """The value the last `key=`, `+key=` or `++key=` override among args gives, if any."""
    value = None
    for arg in args:
        name, sep, text = arg.partition("=")
        if sep and name.lstrip("+") == key:
            value = text
    return value


def latest_run(runs_dir: Path) -> Path | None:
    """The run under runs_dir whose checkpoints/last.ckpt was written most recently."""
    runs = [ckpt.parents[1] for ckpt in runs_dir.glob(f"*/{LAST_CKPT}")]
    return max(runs, key=lambda run: (run / LAST_CKPT).stat().st_mtime) if runs else None


def runs_dir_of(conf_dir: Path, overrides: Sequence[str]) -> Path:
    """<paths.log_dir>/<task_name>/runs as the config and these overrides compose it."""
    from hydra import compose, initialize_config_dir

    task_overrides = [
        o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/", "ckpt_path"))
    ]
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        cfg = compose("train", overrides=task_overrides)
    return Path(cfg.paths.log_dir) / cfg.task_name / "runs"


def resume_argv(argv: Sequence[str], conf_dir: Path) -> list[str]:
    """train.py's command line, completed for `ckpt_path=last` before Hydra reads it.

    Adds `paths.output_dir=RUN` (the most recent run) when no run directory is named in a
    single run, and `hydra.output_subdir=.hydra/resume_<date_time>` so the first session's
    .hydra/ files stay. Other command lines come back unchanged.
    """
    argv = list(argv)
    args = argv[1:]
    if override_value(args, "ckpt_path") != LAST:
        return argv
    extra = []
    if override_value(args, "hydra.output_subdir") is None:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
        extra.append(f"hydra.output_subdir=.hydra/resume_{stamp}")
    multirun = any(a in MULTIRUN_FLAGS for a in args) or override_value(args, "hydra.mode")
    named = any(override_value(args, k) is not None for k in ("paths.output_dir", "hydra.run.dir"))
    if not multirun and not named:
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        try:
            runs_dir = runs_dir_of(conf_dir, overrides)
        except Exception:  # a bad override: Hydra reports it properly next
            return argv + extra
        run = latest_run(runs_dir)
        if run is None:
            raise RunDirError(
                f"ckpt_path=last: no run under {runs_dir} has a {LAST_CKPT} to continue. "
                f"Name the run with paths.output_dir=RUN_DIR, or pass a checkpoint file "
                f"as ckpt_path=PATH."
            )
        log.info("ckpt_path=last: continuing the most recent run, %s", run)
        extra.append(f"paths.output_dir={run}")
    return argv + extra


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint file to resume from: `last` is the run directory's last.ckpt."""
    if ckpt_path is None:
        return None
    if ckpt_path == LAST:
        path = output_dir / LAST_CKPT
        if not path.is_file():
            raise ModelConfigError(
                f"ckpt_path=last: {path} does not exist (no epoch of this run directory "
                f"finished). Name the run to continue with paths.output_dir=RUN_DIR (in a "
                f"sweep: hydra.sweep.dir=SWEEP_DIR), or pass a checkpoint file as ckpt_path."
            )
        ckpt_path = str(path)
    elif not Path(ckpt_path).is_file():
        raise ModelConfigError(
            f"ckpt_path={ckpt_path} does not exist. To resume, pass a run's "
            f"checkpoints/last.ckpt (or best.ckpt), ckpt_path=last, or leave ckpt_path unset."
        )
    read_training_checkpoint(ckpt_path)  # a bad file stops here, named, before any slow step
    return ckpt_path


def read_training_checkpoint(ckpt_path: str | Path) -> dict:
    """A training checkpoint loaded safely (tensors only), or a one-line error naming it."""
    checkpoint = load_safely(ckpt_path, "ckpt_path", ModelConfigError, RESUME_HINT)
    if not isinstance(checkpoint, dict) or not {"state_dict", "epoch"} <= set(checkpoint):
        raise ModelConfigError(
            f"ckpt_path={ckpt_path} is not a training checkpoint of this framework (it lacks "
            f"state_dict and epoch). {RESUME_HINT}"
        )
    return checkpoint


def resume_step(ckpt_path: str) -> int:
    """The logging step the resumed run starts at (events from there on are replaced)."""
    checkpoint = read_training_checkpoint(ckpt_path)
    try:
        return int(
            checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]
        )
    except (KeyError, TypeError):
        return int(checkpoint.get("global_step", 0))
