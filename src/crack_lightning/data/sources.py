"""What a data set is: a list of labelled sources, and the one finder of their images.

A source (conf/data/sources/*.yaml, set under `data.sources.NAME`) names a root folder,
the class folders under it that hold cracked (Positive) and uncracked (Negative) images,
and how to split it (settings.SplitKind). `data.root=DIR` is shorthand for one source
named `root` whose classes are DIR/Negative and DIR/Positive, split per data.split: it is
found, checked, split, recorded and cached by exactly the same code as data.sources, and
only its messages differ (they name data.root and point at the METU data set).
A masks source (`kind: masks`, conf/data/sources/masks.yaml) is photos with crack masks
cut into labelled tiles instead: data/masks.py finds its photos (with image_files) and
labels its tiles.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from crack_lightning.errors import DataError
from crack_lightning.settings import (
    CLASS_NAMES,
    SOURCE_HINT,
    MasksSourceSettings,
    check_distance,
    source_settings,
)

# the name of the one source data.root=DIR stands for (the manifest's `source` column)
ROOT_SOURCE = "root"
DATA_HINT = (
    "Get the METU 'Concrete Crack Images for Classification' data set "
    "(doi:10.17632/5y9wdsg2zt.2, see docs/data.md) and extract it so that Negative/ and "
    "Positive/ sit directly under data.root, or point data.root=/path/to/folder at a copy. "
    "To try the framework without it, use data=synthetic."
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSpec:
    """One source, checked."""

    name: str
    root: Path
    classes: dict[str, list[str]]  # Negative/Positive -> folder patterns under root
    subsets: list[str] | None
    split: str  # a settings.SplitKind value
    group_pattern: str | None
    group_distance: int
    download: dict | None = None
    shorthand: bool = False  # data.root=DIR rather than an entry of data.sources
    # a masks source's settings (photos with crack masks, cut into tiles: data/masks.py)
    tiles: MasksSourceSettings | None = None

    @classmethod
    def from_config(cls, name: str, config: Mapping) -> SourceSpec:
        """data.sources.NAME, checked by its schema (settings.SourceSettings, or
        MasksSourceSettings for `kind: masks`)."""
        settings = source_settings(name, config)
        if isinstance(settings, MasksSourceSettings):
            return cls(
                name=name,
                root=Path(settings.root),
                classes={label: [] for label in CLASS_NAMES},
                subsets=None,
                split=settings.split,
                group_pattern=None,
                group_distance=0,
                tiles=settings,
            )
        return cls(
            name=name,
            root=Path(settings.root),
            classes={label: list(settings.classes[label]) for label in CLASS_NAMES},
            subsets=list(settings.subsets) if settings.subsets is not None else None,
            split=settings.split.value,
            group_pattern=settings.group_pattern,
            group_distance=settings.group_distance,
            download=dict(settings.download) if settings.download else None,
        )

    @classmethod
    def from_root(cls, root: str | Path, split: str, group_distance: int) -> SourceSpec:
        """The one source `data.root=DIR` stands for: DIR/Negative and DIR/Positive."""
        split = getattr(split, "value", split)
        if split == "grouped":
            check_distance(group_distance)
        return cls(
            name=ROOT_SOURCE,
            root=Path(root),
            classes={name: [name] for name in CLASS_NAMES},
            subsets=None,
            split=split,
            group_pattern=None,
            group_distance=int(group_distance),
            shorthand=True,
        )

    @property
    def where(self) -> str:
        """The setting that names this source, for messages."""
        return "data" if self.shorthand else f"data.sources.{self.name}"

    def patterns(self, label: str) -> list[str]:
        """The class's folder patterns; with subsets, nested ones only under those."""
        keep = [p for p in self.classes[label] if "/" not in p or self.subsets is None]
        if self.subsets is not None:
            wanted = {s.lower() for s in self.subsets}
            keep += [
                p for p in self.classes[label] if "/" in p and p.split("/")[0].lower() in wanted
            ]
        return keep


def parse_sources(config: Mapping) -> list[SourceSpec]:
    """The non-null entries of data.sources, in their order."""
    specs = [
        SourceSpec.from_config(str(name), entry)
        for name, entry in config.items()
        if entry is not None
    ]
    if not specs:
        raise DataError("data.sources names no source (all entries are null). " + SOURCE_HINT)
    return specs


def data_sources(
    root: str | Path, sources: Mapping | None, split: str, group_distance: int
) -> list[SourceSpec]:
    """The data set's sources: data.sources when set, else the one source of data.root."""
    if sources is not None:
        return parse_sources(sources)
    return [SourceSpec.from_root(root, split, group_distance)]


def _subfolders(root: Path, depth: int = 2) -> list[str]:
    """Folders under root up to `depth` levels, as relative POSIX paths."""
    found, level = [], [root]
    for _ in range(depth):
        level = [
            p
            for parent in level
            for p in sorted(parent.iterdir())
            if p.is_dir() and not p.name.startswith(".")
        ]
        found += [p.relative_to(root).as_posix() for p in level]
    return found


def _missing_root(spec: SourceSpec) -> DataError:
    root = spec.root
    if spec.shorthand:
        state = "does not exist" if not root.exists() else "is not a folder"
        return DataError(f"data.root={root} {state}. {DATA_HINT}")
    if spec.tiles is not None:
        return DataError(
            f"{spec.where}.root={root} is not a folder. Point it at a folder of photos "
            f"with PHOTO{spec.tiles.mask_suffix} beside each (or set {spec.where}.mask_dir)."
        )
    return DataError(
        f"{spec.where}.root={root} is not a folder. Point it at the source's images "
        f"(folders {', '.join(spec.classes['Positive'] + spec.classes['Negative'])})."
    )


def _no_match(spec: SourceSpec, name: str, folders: list[str]) -> DataError:
    if spec.shorthand:
        top = [f for f in folders if "/" not in f]
        hint = DATA_HINT
        wanted = {n.lower() for n in CLASS_NAMES}
        if len(top) == 1 and wanted <= {f.split("/")[-1].lower() for f in folders}:
            hint = f"The class folders are one level down: set data.root={spec.root / top[0]}"
        found = ", ".join(f"{f}/" for f in top) or "no folders"
        return DataError(
            f"data.root={spec.root} must hold the class folders Negative/ and Positive/ (any "
            f"letter case) with the images inside; found {found}. {hint}"
        )
    return DataError(
        f"{spec.where}.classes.{name}={spec.patterns(name)} matches no folder under "
        f"{spec.root} (it has {', '.join(folders[:12]) or 'no folders'}). Fix the "
        f"mapping, {spec.where}.subsets, or {spec.where}.root."
    )


def class_folders(spec: SourceSpec) -> dict[int, list[Path]]:
    """Label -> the folders its patterns match (case-insensitive globs, up to two levels
    deep), each label at least one; a missing root or a mapping that matches nothing is
    a DataError naming the source's setting."""
    if not spec.root.is_dir():
        raise _missing_root(spec)
    folders = _subfolders(spec.root)
    result: dict[int, list[Path]] = {}
    for label, name in enumerate(CLASS_NAMES):
        patterns = [p.lower() for p in spec.patterns(name)]
        matched = [f for f in folders if any(fnmatch.fnmatchcase(f.lower(), p) for p in patterns)]
        if not matched:
            raise _no_match(spec, name, folders)
        result[label] = [spec.root / f for f in matched]
    return result


def source_folders(spec: SourceSpec) -> list[Path]:
    """The folders a source reads: its class folders, or a masks source's root."""
    if spec.tiles is None:
        return [folder for group in class_folders(spec).values() for folder in group]
    if not spec.root.is_dir():
        raise _missing_root(spec)
    return [spec.root]


def refuse_shared_folders(specs: Sequence[SourceSpec]) -> None:
    """Two sources must not read the same folder (the same root twice, or one source's
    class folder inside another's): every image there would count twice, once per source."""
    seen: dict[str, SourceSpec] = {}
    for spec in specs:
        folders = {os.path.realpath(folder) for folder in source_folders(spec)}
        for folder in sorted(folders):
            for other_folder, other in seen.items():
                inner, outer = sorted((folder, other_folder), key=len)[::-1]
                if os.path.join(inner, "").startswith(os.path.join(outer, "")):
                    raise DataError(
                        f"{other.where} and {spec.where} both read {inner} (roots "
                        f"{other.root} and {spec.root}): its images would count twice. "
                        f"Remove one of them, or give them disjoint class folders "
                        f"({spec.where}.classes or .subsets)."
                    )
        seen.update(dict.fromkeys(folders, spec))


def is_image_name(name: str | Path) -> bool:
    """Whether training reads the file: an image extension, any letter case."""
    return str(name).lower().endswith(IMG_EXTENSIONS)


NOT_REGULAR = "not a regular file or a link to one"
LOOP = "a link to a folder that holds it (a loop): not followed"


def walk_files(folder: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(regular files, (other entry, why it is not read)) under folder, sub-folders and
    links included, sorted.

    Only regular files and links to them are worth reading: a FIFO or device named
    `*.jpg` would block whoever opens it. A link to a folder that holds the one walked
    (a loop) is not followed; any other real folder is walked once, through its own path
    before any link to it, and a real file reached by several paths counts once, by its
    own path if it has one. So links cannot multiply the images or walk forever.
    """
    start = os.path.realpath(folder)
    found: dict[tuple[int, int], tuple[bool, str]] = {}  # real file -> (via a link, path)
    others: list[tuple[str, str]] = []
    walked: set[tuple[int, int]] = set()
    plain, linked = [str(folder)], []  # folders to walk: real ones first
    while plain or linked:
        top = plain.pop() if plain else linked.pop(0)
        try:
            info = os.stat(top)
            entries = sorted(os.scandir(top), key=lambda entry: entry.name)
        except OSError as err:
            others.append((top, f"cannot be listed ({err.strerror})"))
            continue
        if (info.st_dev, info.st_ino) in walked:
            continue
        walked.add((info.st_dev, info.st_ino))
        for entry in entries:
            try:
                link = entry.is_symlink()
                if entry.is_dir():  # follows links
                    if not link:
                        plain.append(entry.path)
                    elif os.path.join(start, "").startswith(
                        os.path.join(os.path.realpath(entry.path), "")
                    ):
                        others.append((entry.path, LOOP))
                    else:
                        linked.append(entry.path)
                    continue
                regular = entry.is_file()  # a regular file, or a link to one
                key = (entry.stat().st_dev, entry.stat().st_ino) if regular else None
            except OSError:
                regular = False
            if not regular:
                others.append((entry.path, NOT_REGULAR))
            elif key not in found or (link, entry.path) < found[key]:
                found[key] = (link, entry.path)
    return sorted(path for _, path in found.values()), sorted(others)


def image_files(folder: Path) -> list[str]:
    """The image files under folder, sub-folders included, sorted: regular files (or links
    to them) with an image name, each real file and folder once (walk_files). Entries
    named like images that are not read (a broken link, a FIFO) are named in a warning,
    so that nothing is left out silently (data.check=false runs no report)."""
    files, others = walk_files(folder)
    unread = [f"{path} ({why})" for path, why in others if is_image_name(os.path.basename(path))]
    if unread:
        log.warning(
            "%d image name(s) under %s not read: %s", len(unread), folder, "; ".join(unread)
        )
    return [path for path in files if is_image_name(os.path.basename(path))]


def scan_source(spec: SourceSpec) -> list[tuple[str, int]]:
    """(path, label) of every image in the source's class folders, sorted by path; every
    class folder must hold images."""
    samples = []
    for label, folders in class_folders(spec).items():
        for folder in folders:
            files = image_files(folder)
            if not files:
                looked = f"looked for {', '.join(IMG_EXTENSIONS)} files"
                raise DataError(
                    f"Class folder {folder} holds no images ({looked}). Every class needs "
                    f"images to train on. {DATA_HINT}"
                    if spec.shorthand
                    else f"{spec.where}: class folder {folder} holds no images ({looked})."
                )
            samples += [(path, label) for path in files]
    return sorted(samples)


def scan_samples(root: str | Path) -> list[tuple[str, int]]:
    """All (image path, label) pairs under root/Negative and root/Positive."""
    return scan_source(SourceSpec.from_root(root, "random", 0))
