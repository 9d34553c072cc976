"""The on-disk layout of a data set: ROOT/Negative/*.jpg and ROOT/Positive/*.jpg."""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from crack_lightning.errors import DataError

# index = class label: Negative (no crack) = 0, Positive (crack) = 1
CLASS_NAMES = ("Negative", "Positive")

DATA_HINT = (
    "Get the METU 'Concrete Crack Images for Classification' data set "
    "(doi:10.17632/5y9wdsg2zt.2, see docs/data.md) and extract it so that Negative/ and "
    "Positive/ sit directly under data.root, or point data.root=/path/to/folder at a copy. "
    "To try the framework without it, use data=synthetic."
)


def find_class_dirs(root: Path) -> dict[str, Path]:
    """Map Negative/Positive to their folders, names matched case-insensitively."""
    if not root.exists():
        raise DataError(f"data.root={root} does not exist. {DATA_HINT}")
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder. {DATA_HINT}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    by_name: dict[str, list[Path]] = {}
    for sub in subdirs:
        by_name.setdefault(sub.name.lower(), []).append(sub)
    wanted = {name.lower() for name in CLASS_NAMES}
    if set(by_name) != wanted or any(len(v) > 1 for v in by_name.values()):
        found = ", ".join(f"{p.name}/" for p in subdirs) or "no folders"
        hint = DATA_HINT
        if len(subdirs) == 1 and _has_class_dirs(subdirs[0]):
            hint = f"The class folders are one level down: set data.root={subdirs[0]}"
        raise DataError(
            f"data.root={root} must hold exactly two class folders, Negative/ and Positive/ "
            f"(any letter case), with the images inside; found {found}. {hint}"
        )
    return {name: by_name[name.lower()][0] for name in CLASS_NAMES}


def _has_class_dirs(folder: Path) -> bool:
    names = {p.name.lower() for p in folder.iterdir() if p.is_dir()}
    return {n.lower() for n in CLASS_NAMES} <= names


class CrackImageFolder(ImageFolder):
    """ImageFolder whose classes are fixed to Negative=0, Positive=1 in any letter case."""

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        dirs = find_class_dirs(Path(directory))
        names = [dirs[name].name for name in CLASS_NAMES]
        return names, {folder: label for label, folder in enumerate(names)}


def scan_samples(root: str | Path) -> list[tuple[str, int]]:
    """All (image path, label) pairs under root, sorted by path; every class must have images."""
    folder = CrackImageFolder(root, allow_empty=True)
    counts = [0] * len(CLASS_NAMES)
    for _, label in folder.samples:
        counts[label] += 1
    for label, count in enumerate(counts):
        if count == 0:
            path = Path(root) / folder.classes[label]
            raise DataError(
                f"Class folder {path} holds no images (looked for {', '.join(IMG_EXTENSIONS)} "
                f"files). Every class needs images to train on. {DATA_HINT}"
            )
    return folder.samples
