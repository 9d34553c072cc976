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

A resumed run must train on the data it started with: the data settings that decide the
split are compared with the run's before anything is read (`changed_data_settings`), and
the split this session makes with the run's split_manifest.csv (`manifest_changes`) twice:
once it is made, before the feature cache is filled, leaving aside images the manifest
lacks that cannot be decoded (the cache skipped those when the manifest was written:
`undecodable_additions`), and again after the cache, before the manifest is replaced. A
difference stops the run, naming it, unless resume_data_changed=allow.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from crack_lightning.errors import ModelConfigError, RunDirError, UnreadableImage
from crack_lightning.io import load_safely, move_into_place

if TYPE_CHECKING:
    from crack_lightning.data.splits import SourceSamples

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


def resume_output_subdir() -> str:
    """The override that puts a resumed session's .hydra/ files beside the first's."""
    return f"hydra.output_subdir=.hydra/resume_{datetime.now():%Y-%m-%d_%H-%M-%S_%f}"


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
        extra.append(resume_output_subdir())
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


# --- the data a resumed run trains on ---------------------------------------------------

# data settings that decide which images a run has and where they go; paths (root, archive)
# are left to the manifest, since moving a data set's folder changes nothing
SPLIT_SETTINGS = (
    "sources",
    "split",
    "val_fraction",
    "test_fraction",
    "seed",
    "group_distance",
    "holdout_source",
)
PATH_SETTINGS = ("root", "archive", "download", "cache_dir")
CHANGED_HINT = (
    "Resuming would train on another split than the run's epochs so far (and replace its "
    "split_manifest.csv). Resume with the run's data settings and files, start a new run, "
    "or pass resume_data_changed=allow to continue on the new data anyway."
)


def reference_run(ckpt_path: str | None, output_dir: Path, manifest_name: str) -> Path | None:
    """The run directory whose split a resumed session must keep: the run directory it
    continues in, or the one the checkpoint file was written in; None when neither holds
    a manifest (a fresh run, or a checkpoint from elsewhere)."""
    if ckpt_path is None:
        return None
    # RUN/checkpoints/NAME.ckpt was written in RUN
    for run in (output_dir, *Path(ckpt_path).resolve().parents[1:2]):
        if (run / manifest_name).is_file():
            return run
    return None


def stored_config(run: Path, manifest_name: str) -> DictConfig | None:
    """The config of the session that wrote run's manifest: the newest .hydra/config.yaml
    (or .hydra/resume_*/config.yaml) written before it; None for runs made without Hydra."""
    manifest_time = (run / manifest_name).stat().st_mtime_ns
    configs = [
        path
        for path in (run / ".hydra").glob("**/config.yaml")
        if path.stat().st_mtime_ns <= manifest_time
    ]
    if not configs:
        return None
    newest = max(configs, key=lambda path: path.stat().st_mtime_ns)
    try:
        return OmegaConf.load(newest)
    except Exception:  # an unreadable old config: the manifest comparison still runs
        log.warning("Cannot read %s; comparing the split manifest only.", newest)
        return None


def _value(cfg: DictConfig, key: str) -> Any:
    """A data setting, resolved where its interpolations resolve (else as written)."""
    data = cfg.get("data") or {}
    if key not in data:
        return None
    try:
        value = OmegaConf.select(cfg, f"data.{key}", throw_on_resolution_failure=True)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except Exception:  # an interpolation that resolves only inside Hydra: compare as written
        return OmegaConf.to_container(data, resolve=False)[key]


def _source_changes(old: Mapping | None, new: Mapping | None) -> list[str]:
    old, new = dict(old or {}), dict(new or {})
    changes = [f"data.sources.{name} added" for name in sorted(set(new) - set(old))]
    changes += [f"data.sources.{name} removed" for name in sorted(set(old) - set(new))]
    for name in sorted(set(old) & set(new)):
        before, after = dict(old[name] or {}), dict(new[name] or {})
        for key in sorted(set(before) | set(after)):
            if key not in PATH_SETTINGS and before.get(key) != after.get(key):
                changes.append(
                    f"data.sources.{name}.{key}: {before.get(key)!r} -> {after.get(key)!r}"
                )
    return changes


def changed_data_settings(stored: DictConfig, cfg: DictConfig) -> list[str]:
    """The split-deciding data settings (SPLIT_SETTINGS) that differ between a run's
    stored config and this session's, each as `data.KEY: old -> new`."""
    changes = []
    for key in SPLIT_SETTINGS:
        before, after = _value(stored, key), _value(cfg, key)
        if key == "sources":
            changes += _source_changes(before, after)
        elif before != after:
            changes.append(f"data.{key}: {before!r} -> {after!r}")
    return changes


def read_manifest(path: Path) -> dict[tuple[str, str], tuple[str, ...]]:
    """A split manifest as {(source, path): (the row's other columns)}."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return {(row[0], row[1]): tuple(row[2:]) for row in rows if len(row) >= 2}


def manifest_changes(
    stored: Path,
    rows: Iterable[Sequence[str]],
    examples: int = 2,
    unsure: Collection[tuple[str, str]] = (),
) -> list[str]:
    """How the split `rows` (a manifest's rows) differs from the manifest at `stored`:
    images added, removed, and moved between classes or splits, with examples. `unsure`
    (source, path) keys are not counted as added."""
    old = read_manifest(stored)
    new = {(row[0], row[1]): tuple(row[2:]) for row in rows if (row[0], row[1]) not in unsure}

    def named(keys: list[tuple[str, str]]) -> str:
        shown = ", ".join(f"{source}:{path}" for source, path in keys[:examples])
        return f"e.g. {shown}" + (", ..." if len(keys) > examples else "")

    changes = []
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    moved = sorted(key for key in set(old) & set(new) if old[key] != new[key])
    if added:
        changes.append(f"{len(added)} image(s) added ({named(added)})")
    if removed:
        changes.append(f"{len(removed)} image(s) removed ({named(removed)})")
    if moved:
        key = moved[0]
        example = f"{key[0]}:{key[1]} {'/'.join(old[key])} -> {'/'.join(new[key])}"
        more = ", ..." if len(moved) > 1 else ""
        changes.append(f"{len(moved)} image(s) in another class or split (e.g. {example}{more})")
    return changes


def undecodable_additions(stored: Path, data: SourceSamples) -> set[tuple[str, str]]:
    """The (source, path) keys of this split's images that the manifest at `stored` lacks
    and that cannot be decoded: the feature cache skips such an image (data.on_bad_image=
    skip), as it did when the manifest was written, so its absence there is no change yet.
    Only these few images are decoded."""
    # the data code is loaded by a resumed training run only, not by resume_argv's callers
    from crack_lightning.data.decode import load_sample
    from crack_lightning.data.splits import manifest_key

    old = read_manifest(stored)
    unsure = set()
    for index, (sample, _) in enumerate(data.samples):
        key = manifest_key(data, index)
        if key not in old:
            try:
                load_sample(sample)
            except UnreadableImage:
                unsure.add(key)
    return unsure


def refuse_or_warn(run: Path, changes: list[str], allow: bool, what: str) -> None:
    """Stop naming `changes` (RunDirError), or with allow=True log them and go on."""
    if not changes:
        return
    text = "; ".join(changes)
    if not allow:
        raise RunDirError(f"Resuming {run}: {what} differ from the run's: {text}. {CHANGED_HINT}")
    log.warning(
        "Resuming %s although %s differ from the run's (resume_data_changed=allow): %s",
        run,
        what,
        text,
    )


def keep_old_manifest(path: Path) -> Path:
    """Move a replaced manifest aside as split_manifest.until_<date_time>.csv."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    kept = path.with_name(f"{path.stem}.until_{stamp}{path.suffix}")
    move_into_place(path, kept)
    log.warning("The run's earlier split is kept as %s.", kept)
    return kept
