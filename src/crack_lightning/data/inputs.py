"""Turning command-line inputs (files, folders, glob patterns) into image files, and the
class a file is filed under."""

from __future__ import annotations

import glob
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from crack_lightning.data.layout import CLASS_NAMES

_GLOB_CHARS = set("*?[")


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursively, image extensions only) and glob patterns.

    Returns the files to classify, in a stable order without repeats, and (input, reason)
    for every argument that yielded nothing.
    """
    files: dict[Path, None] = {}
    problems: list[tuple[str, str]] = []
    for item in inputs:
        item = str(item)
        path = Path(item).expanduser()
        if _GLOB_CHARS & set(item):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found = [p for p in found if p.is_file()]
            reason = "the pattern matches no file"
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p))
            reason = f"the folder holds no images ({', '.join(IMG_EXTENSIONS)})"
        elif path.is_file():
            found, reason = [path], ""
        else:
            found, reason = [], "no such file or folder"
        if not found:
            problems.append((item, reason))
        files.update(dict.fromkeys(found))
    return list(files), problems


def label_from_path(path: Path) -> int | None:
    """The class a file is filed under: the nearest parent folder named Negative or Positive."""
    names = {name.lower(): label for label, name in enumerate(CLASS_NAMES)}
    for parent in path.parents:
        if parent.name.lower() in names:
            return names[parent.name.lower()]
    return None
