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

import ctypes
import ctypes.util
import functools
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from crack_lightning.errors import CrackLightningError

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


# --- the process: allocator and quiet logs -------------------------------------------------

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


def tune_malloc() -> bool:
    """Stop glibc from handing activation buffers back to the kernel after every step.

    By default glibc serves large blocks with mmap and unmaps them on free, so each
    forward pass page-faults its activations back in (docs/speed.md). Keeping
    freed memory in the heap avoids that. Called before DataLoader workers fork, so
    they inherit it. Returns whether the setting was applied (glibc only);
    CRACK_LIGHTNING_MALLOC=default leaves the allocator alone.
    """
    if os.environ.get("CRACK_LIGHTNING_MALLOC") == "default" or not sys.platform.startswith(
        "linux"
    ):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1  # an int: the largest we can pass
    ok &= mallopt(_M_TOP_PAD, 1 << 30) == 1
    return bool(ok)


# Warnings that are expected with a frozen backbone or this library stack and that
# would otherwise bury the messages users need to read.
_EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",  # the frozen backbone
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning 2.6 on torch 2.14
    r".*callbacks used to create the checkpoint need to be provided.*",  # final evaluation
    # conf/hydra/launcher/submitit_*.yaml replace the plugin's configs of the same names
    r"\s*'hydra/launcher/submitit_(local|slurm)' is validated against ConfigStore schema",
)


def _not_an_advert(record: logging.LogRecord) -> bool:
    """Lightning's tips to install its cloud-logging products are not messages of a run."""
    return not str(record.msg).startswith(_ADVERT)


# how Lightning's adverts begin ("💡 Tip: For seamless cloud logging ... litlogger")
_ADVERT = "\N{ELECTRIC LIGHT BULB} Tip:"


def quiet_logs() -> None:
    """Show each log line once and hide warnings and adverts that need no action."""
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_an_advert not in rank_zero.filters:
        rank_zero.addFilter(_not_an_advert)
    if logging.getLogger().hasHandlers():  # Hydra's handlers print and write train.log
        logging.getLogger("lightning").handlers.clear()
    for chatty in ("onnx_ir", "onnxscript"):  # ONNX export logs every graph rewrite
        logging.getLogger(chatty).setLevel(logging.WARNING)


# --- sweep jobs' folder names ---------------------------------------------------------------
# Readable names for sweep jobs' directories, so TensorBoard shows what each run changed.
#
# TensorBoard names a run by its folder under --logdir; for a sweep that folder is the job
# directory, so `3_model=resnet18,model.lr=0.0003/tensorboard` says what `3/tensorboard`
# does not. conf/train.yaml sets `hydra.sweep.subdir` to use the resolver below.

# folder names stay well under the 255-byte limit of common file systems
MAX_NAME_CHARS = 150
RESOLVER = "job_dir"
# numbers with many digits (Optuna's samples) are shortened to 4 significant digits
_LONG_NUMBER = re.compile(r"(?<![\w.])\d*\.\d{5,}(?:[eE][-+]?\d+)?(?![\w.])")


def job_dir_name(num: int | str, override_dirname: str) -> str:
    """`<job number>_<overrides>`; the number alone keeps names unique, the rest is for people.

    Hydra's override_dirname is `key=value` pairs joined by commas. A "/" in a key (a
    group such as data/augmentation) or a value would nest folders, so it becomes ".".
    Long decimals are rounded (model.lr=0.0003575); the exact values are in the job's
    .hydra/overrides.yaml and in the sweep summary.
    """
    text = re.sub(r"\s+", "", str(override_dirname)).replace("/", ".").replace("\\", ".")
    text = _LONG_NUMBER.sub(lambda m: f"{float(m.group()):.4g}", text)
    text = text[:MAX_NAME_CHARS].rstrip(",")
    return f"{num}_{text}" if text else str(num)


def register_resolvers() -> None:
    """Make ${job_dir:NUM,OVERRIDES} available to Hydra (call before it composes)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, job_dir_name)
