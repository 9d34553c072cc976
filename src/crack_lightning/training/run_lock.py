"""One training at a time per run directory, and no run replaced by accident.

Two train.py runs writing into one folder would mix their checkpoints, TensorBoard events,
logs and .hydra/ files without an error. So the run holds `<run dir>/run.lock` (its host,
process id and start time) while it trains. A second run there is refused while the first
lives; a lock whose process is gone (killed, crashed, the machine restarted) is stale and
taken over, so `ckpt_path=last` after a SIGKILL just works.

A run directory that holds a run (its split manifest, metrics.json or a checkpoint) is
trained in again only to continue that run (`ckpt_path=last`, or a checkpoint of that
directory) or, with `overwrite=true`, to replace it: the old run is then deleted once the
settings are checked. Anything else is refused before Hydra writes there; a sweep's job
folders likewise (commands/hydra_callbacks.py checks them, `train()` again).

Processes of the same run share the directory legitimately: only the first process of a
run (rank 0 on node 0) takes the lock or applies the rule; Lightning's DDP processes and
those torchrun/srun start with a higher rank leave it alone. Each job of a sweep has its
own directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from crack_lightning.errors import ConfigError, RunDirError
from crack_lightning.training.distributed import process_rank
from crack_lightning.training.resume import LAST, LAST_CKPT, MULTIRUN_FLAGS, override_value

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# what a run writes into its directory once under way: its split, its metrics at the end
MANIFEST_NAME = "split_manifest.csv"
METRICS_NAME = "metrics.json"
CHECKPOINTS = "checkpoints"
# kept when overwrite=true replaces a run: what Hydra wrote for this session, and the lock
KEPT_ON_REPLACE = (".hydra", LOCK_NAME)


def first_process(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is the one of its run that owns the run directory."""
    env = os.environ if env is None else env
    return process_rank(env) == 0 and env.get("LOCAL_RANK", "0") == env.get("NODE_RANK", "0") == "0"


def _start_time(pid: int) -> str | None:
    """When process pid started (Linux: clock ticks since boot), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def holder(lock: Path) -> dict | None:
    """The live run holding this lock; None when there is no lock or it is stale."""
    try:
        owner = json.loads(lock.read_text())
        pid = int(owner["pid"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: a run killed while writing it
    if owner.get("host") != socket.gethostname():
        return owner  # cannot tell whether it lives: assume it does
    if pid == os.getpid() or not _alive(pid):
        return None
    started = owner.get("started")
    if started is not None and _start_time(pid) not in (None, started):
        return None  # the pid now belongs to another process
    return owner


def _refusal(run_dir: Path, owner: Mapping) -> RunDirError:
    return RunDirError(
        f"paths.output_dir={run_dir} is in use by another training (process {owner.get('pid')} "
        f"on {owner.get('host')}, since {owner.get('since')}); two runs in one directory "
        f"would mix their checkpoints and logs. Choose another paths.output_dir, or wait for "
        f"that run to end (to continue it afterwards: ckpt_path=last). If that process is "
        f"gone for good, delete {run_dir / LOCK_NAME}."
    )


def acquire(run_dir: Path) -> Path:
    """Create run_dir/run.lock for this process, taking over a stale one; or refuse."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    partial = run_dir / f".{LOCK_NAME}.{os.getpid()}"
    partial.write_text(json.dumps(record))
    try:
        for _ in range(3):
            try:
                os.link(partial, lock)  # atomic: exists with its content, or not at all
                return lock
            except FileExistsError:
                owner = holder(lock)
                if owner is not None:
                    raise _refusal(run_dir, owner) from None
                lock.unlink(missing_ok=True)  # stale: take it over
        raise RunDirError(f"could not lock {run_dir}: another run keeps taking {lock}.")
    finally:
        partial.unlink(missing_ok=True)


def release(lock: Path) -> None:
    """Remove the lock if this process still holds it."""
    try:
        if int(json.loads(lock.read_text())["pid"]) == os.getpid():
            lock.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold run_dir for the duration of one training (first process of the run only)."""
    if not first_process():
        yield
        return
    lock = acquire(Path(run_dir))
    try:
        yield
    finally:
        release(lock)


def refuse_busy_run_dir(argv: Sequence[str]) -> None:
    """Before Hydra writes .hydra/ and train.log there: refuse a named run directory that
    a live run holds (the lock itself is taken once training starts)."""
    args = argv[1:]
    if any(a in MULTIRUN_FLAGS for a in args) or not first_process():
        return
    named = override_value(args, "hydra.run.dir") or override_value(args, "paths.output_dir")
    if named:
        owner = holder(Path(named) / LOCK_NAME)
        if owner is not None:
            raise _refusal(Path(named), owner)


# --- a run directory that holds a run -----------------------------------------------------


def run_files(run_dir: Path) -> list[Path]:
    """What shows that run_dir holds a run: its split manifest, metrics, checkpoints."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in (MANIFEST_NAME, METRICS_NAME)]
    return [p for p in found if p.is_file()] + sorted((run_dir / CHECKPOINTS).glob("*.ckpt"))


def continues(run_dir: Path, ckpt_path: str | None) -> bool:
    """Whether ckpt_path continues the run in run_dir (`last`, or one of its checkpoints)."""
    if ckpt_path is None:
        return False
    return ckpt_path == LAST or Path(ckpt_path).resolve().is_relative_to(Path(run_dir).resolve())


def refuse_replacing(
    run_dir: Path, ckpt_path: str | None, overwrite: bool, setting: str = "paths.output_dir"
) -> None:
    """Stop a new run in a directory that holds one, unless overwrite=true says to replace
    it; continuing it (ckpt_path) is what the directory is for."""
    run_dir = Path(run_dir)
    if continues(run_dir, ckpt_path):
        if overwrite:
            raise ConfigError(
                f"ckpt_path={ckpt_path} continues the run in {run_dir}, and overwrite=true "
                f"would delete it: pass one of them."
            )
        return
    found = run_files(run_dir)
    if overwrite or not found:
        return
    names = ", ".join(str(p.relative_to(run_dir)) for p in found)
    advice = (
        f"To keep it, choose another {setting}; continue it with ckpt_path=last"
        if (run_dir / LAST_CKPT).is_file()
        else f"It finished no epoch, so there is nothing to continue: choose another {setting}"
    )
    raise RunDirError(
        f"{setting}={run_dir} holds a run ({names}); a new run there would replace it. "
        f"{advice}, or replace it with overwrite=true."
    )


def refuse_replacing_jobs(sweep_dir: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """The rule for every job folder of a sweep directory, before the sweep starts: a job
    folder holding a run is continued (ckpt_path=last) or replaced (overwrite=true)."""
    sweep_dir = Path(sweep_dir)
    if overwrite or ckpt_path == LAST or not sweep_dir.is_dir():
        return
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and run_files(p))
    if jobs:
        shown = ", ".join(jobs[:3]) + (", ..." if len(jobs) > 3 else "")
        raise RunDirError(
            f"hydra.sweep.dir={sweep_dir} holds runs in {len(jobs)} job folder(s) ({shown}); "
            f"a new sweep there would replace them. To keep them, choose another "
            f"hydra.sweep.dir; continue them with ckpt_path=last, or replace them with "
            f"overwrite=true."
        )


def replace_run(run_dir: Path) -> None:
    """overwrite=true: delete the run in run_dir (all but KEPT_ON_REPLACE and Hydra's log),
    so that none of its checkpoints, curves or split mixes with the new run's."""
    run_dir = Path(run_dir)
    if not run_files(run_dir):
        return
    for entry in sorted(run_dir.iterdir()):
        if entry.name in KEPT_ON_REPLACE or entry.suffix == ".log":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    log.warning("overwrite=true: the run that was in %s is deleted; a new one starts.", run_dir)
