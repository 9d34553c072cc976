"""The one way every command starts: settings as `key=value` composed from conf/.

The wrapper only: the command bodies live in crack_lightning/commands/, and nothing below
them imports this module.

Two kinds of command share it:
- Hydra applications (train, predict): `hydra_app` runs `hydra.main` on conf/<name>.yaml,
  with run directories, logging, multirun sweeps and `--help`/`--cfg job`.
- tools (data, export, summarize, bench, scan_eval): `run_tool` composes conf/<name>.yaml with the
  command line's overrides (a leading bare word may give the `action`), writes nothing
  of its own, and returns an exit code; `--help` prints the settings file.

Both set PROJECT_ROOT (paths in conf/ resolve against the repository), register the
resolvers, tune the allocator, hide noise, and turn our errors into one `error: ...`
line with exit code 2 (no traceback); SIGTERM stops with 143.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from crack_lightning.errors import CrackLightningError
from crack_lightning.runtime import quiet_logs, tune_malloc

USER_ERROR = 2  # a setting or input the message explains
STOPPED = 128 + signal.SIGTERM  # stopped by SIGTERM, as a shell reports it


def project_root() -> Path:
    """The repository (the package is installed editable from src/)."""
    return Path(__file__).resolve().parents[2]


def conf_dir() -> Path:
    """conf/: the single source of every command's defaults."""
    return project_root() / "conf"


def prepare_process() -> None:
    """What every command needs before its config is composed."""
    from crack_lightning.job_names import register_resolvers

    os.environ.setdefault("PROJECT_ROOT", str(project_root()))
    register_resolvers()
    tune_malloc()
    quiet_logs()  # before Hydra composes the config


@contextmanager
def user_errors() -> Iterator[None]:
    """Our errors as one line on stderr and exit 2; SIGTERM (Lightning stopped after the
    current batch) as exit 143."""
    try:
        yield
    except CrackLightningError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR) from None
    except SystemExit as stop:
        if stopped_by_sigterm(stop):
            raise SystemExit(STOPPED) from None
        raise


def stopped_by_sigterm(stop: SystemExit) -> bool:
    """Whether Lightning stopped on SIGTERM; only a command that imported Lightning can
    have, so the others (predict, scan) need not import it to tell."""
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return exceptions is not None and isinstance(stop, exceptions.SIGTERMException)


def hydra_app(config_name: str, task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """A `hydra.main` application on conf/<config_name>.yaml running `task` guarded."""
    import hydra

    @functools.wraps(task)
    def guarded(cfg: DictConfig) -> Any:
        quiet_logs()  # after Hydra set up logging
        with user_errors():
            return task(cfg)

    return hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)(
        guarded
    )


def compose_command(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """conf/<config_name>.yaml with `key=value` overrides, as tests and tools compose it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def tool_overrides(argv: Sequence[str], actions: Sequence[str]) -> list[str]:
    """Overrides from the command line; a first bare word among `actions` is `action=`."""
    words = list(argv)
    if words and actions and "=" not in words[0]:
        if words[0] not in actions:
            raise CrackLightningError(
                f"Unknown action {words[0]!r}; use one of {', '.join(actions)} (see --help)."
            )
        words[0] = f"action={words[0]}"
    for word in words:
        if "=" not in word:
            raise CrackLightningError(f"{word!r} is not key=value (see --help).")
    return words


def compose_tool(config_name: str, argv: Sequence[str], actions: Sequence[str]) -> DictConfig:
    """The tool's config; unknown or missing settings are named with what the tool takes."""
    from hydra.errors import HydraException

    overrides = tool_overrides(argv, actions)
    # keys(), unlike `in`, also lists the required settings (those still ???)
    known = list(compose_command(config_name, []).keys())
    takes = ", ".join(f"{k}=" for k in known if k not in ("paths", "hydra", "data", "task_name"))
    for word in overrides:
        key = word.split("=", 1)[0].split(".", 1)[0]
        if key not in known and not key.startswith(("+", "~")):
            raise CrackLightningError(
                f"Unknown setting {key!r}; this command takes {takes} (see --help)."
            )
    try:
        cfg = compose_command(config_name, overrides)
    except HydraException as err:
        raise CrackLightningError(f"{err} This command takes {takes} (see --help).") from None
    missing = [key for key in cfg if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise CrackLightningError(
            f"Missing setting(s): {', '.join(f'{k}=...' for k in missing)} (see --help)."
        )
    return cfg


def print_help(config_name: str) -> None:
    """The settings file itself, then the file of each group it takes (scan.*, paths.*):
    every setting with its default and what it means."""
    main = conf_dir() / f"{config_name}.yaml"
    print(f"Settings (key=value; defaults from {main}):\n")
    print(main.read_text())
    for entry in OmegaConf.load(main).get("defaults") or []:
        if not isinstance(entry, Mapping):
            continue  # _self_
        for group, option in entry.items():
            path = conf_dir() / group / f"{option}.yaml"
            print(f"\n{group}.* (key=value as {group}.KEY=...; defaults from {path}):\n")
            print(path.read_text())


def run_tool(
    config_name: str,
    task: Callable[[DictConfig], int | None],
    argv: Sequence[str] | None = None,
    actions: Sequence[str] = (),
) -> int:
    """Compose the tool's config from `argv` (default: the command line) and run `task`;
    return its exit code (0 when it returns None), 2 for our errors, 143 on SIGTERM."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print_help(config_name)
        return 0
    prepare_process()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_logs()
    try:
        with user_errors():
            return task(compose_tool(config_name, argv, actions)) or 0
    except SystemExit as stop:
        return int(stop.code or 0)
