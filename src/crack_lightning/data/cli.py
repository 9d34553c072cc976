"""`python -m crack_lightning.data download|check ...`: get and inspect the data set.

Settings are key=value words, as in train.py's overrides:

    python -m crack_lightning.data download [root=data/concrete_crack] [archive=PATH]
    python -m crack_lightning.data check [root=]ROOT [quick=true]

Exit codes: 0 fine, 1 `check` found problems that would corrupt training, 2 a setting
or the data set is wrong in a way the message explains.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from crack_lightning.data.check import check_dataset
from crack_lightning.data.download import ensure_dataset
from crack_lightning.errors import CrackLightningError, DataError

DEFAULT_ROOT = "data/concrete_crack"
SETTINGS = {
    "download": {"root": DEFAULT_ROOT, "archive": None, "keep_archive": "false"},
    "check": {"root": None, "quick": "false"},
}


def parse_settings(command: str, words: Sequence[str]) -> dict[str, str | None]:
    """key=value words (a bare word is the root) over the command's defaults."""
    settings = dict(SETTINGS[command])
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            key, value = "root", word
        if key not in settings:
            raise DataError(
                f"Unknown setting {key!r} for `{command}`; it takes "
                f"{', '.join(f'{k}=' for k in settings)} (see --help)."
            )
        settings[key] = value
    if settings["root"] is None:
        raise DataError(f"`{command}` needs the data root: `{command} ROOT` or `root=ROOT`.")
    return settings


def parse_bool(key: str, value: str | None) -> bool:
    text = str(value).lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise DataError(f"{key}={value} must be true or false.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crack_lightning.data",
        description="Download, unpack and check the METU concrete crack data set.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser(
        "download",
        help="download (or unpack archive=PATH), verify, unpack and count; no-op when done",
        description=(
            "Fetch the METU archive (241 MB, resumable) into ROOT, or unpack a local RAR/ZIP "
            "given as archive=PATH, and check it holds 20,000 images per class. Settings: "
            f"root (default {DEFAULT_ROOT}), archive, keep_archive (keep the downloaded "
            "archive beside ROOT)."
        ),
    )
    download.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    check = commands.add_parser(
        "check",
        help="report counts, sizes, unreadable/truncated files, duplicates, label conflicts",
        description=(
            "Inspect ROOT/Negative and ROOT/Positive; exit 1 if anything would corrupt "
            "training. quick=true skips decoding the images (what train.py runs)."
        ),
    )
    check.add_argument("settings", nargs="*", metavar="[root=]ROOT | quick=true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = parse_settings(args.command, args.settings)
        if args.command == "download":
            ensure_dataset(
                settings["root"],
                archive=settings["archive"],
                keep_archive=parse_bool("keep_archive", settings["keep_archive"]),
            )
            return 0
        quick = parse_bool("quick", settings["quick"])
        report = check_dataset(settings["root"], full=not quick)
        print(report.summary())
        return 0 if report.ok else 1
    except CrackLightningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
