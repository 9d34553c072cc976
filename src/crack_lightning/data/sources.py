"""What a data set is: a list of labelled sources, and the one finder of their images.

A source (conf/data/sources/*.yaml, set under `data.sources.NAME`) names a root folder,
the class folders under it that hold cracked (Positive) and uncracked (Negative) images,
and how to split it (SourceSettings.split). `data.root=DIR` is shorthand for one source
named `root` whose classes are DIR/Negative and DIR/Positive, split per data.split: it is
found, checked, split, recorded and cached by exactly the same code as data.sources, and
only its messages differ (they name data.root and point at the METU data set).
A masks source (`kind: masks`, conf/data/sources/masks.yaml) is photos with crack masks
cut into labelled tiles instead: data/masks.py finds its photos in the source's files and
labels its tiles.

A run lists each source's folders once (list_sources), each file with the size and mtime
of that one walk (SourceFiles): the split, the check, the copies across sources and the
feature cache's key all read that list.
"""

from __future__ import annotations

import enum
import fnmatch
import logging
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from torchvision.datasets.folder import IMG_EXTENSIONS

from crack_lightning.errors import DataError
from crack_lightning.settings import (
    CLASS_NAMES,
    Rule,
    at_least,
    parameters_of,
    plain,
    require,
    settings_of,
)

# the name of the one source data.root=DIR stands for (the manifest's `source` column)
ROOT_SOURCE = "root"
DATA_HINT = (
    "Get the METU 'Concrete Crack Images for Classification' data set "
    "(doi:10.17632/5y9wdsg2zt.2, see docs/data.md) and extract it so that Negative/ and "
    "Positive/ sit directly under data.root, or point data.root=/path/to/folder at a copy. "
    "To try the framework without it, use data=synthetic."
)

SOURCE_HINT = (
    "Add a source from a shipped config with `+data/sources@data.sources.NAME=folder` "
    "(or metu, sdnet2018, masks) and set data.sources.NAME.root=DIR."
)
# the `kind` of a data.sources entry that is photos with crack masks (data/masks.py)
MASKS_KIND = "masks"
# bits of a 64-bit image hash by which near-duplicates may differ (data.group_distance)
GROUP_DISTANCE = Rule(
    "an integer in [0, 16] (bits of a 64-bit hash; about 32 is what unrelated images differ by)",
    lambda bits: 0 <= bits <= 16,
)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


# what data.unpack_limit_gib and every source's download.unpack_limit_gib allow
UNPACK_LIMIT = Rule(
    "a number of GiB above 0 (the most that unpacking one archive may write)",
    lambda gib: isinstance(gib, int | float) and 0 < gib < float("inf"),
    _number,
)
# data.unpack_ratio_limit, download.unpack_ratio_limit: a stored entry's ratio is 1
UNPACK_RATIO_LIMIT = Rule(
    "a number of at least 1 (the most bytes one packed byte of an archive entry may unpack to)",
    lambda ratio: isinstance(ratio, int | float) and 1 <= ratio < float("inf"),
    _number,
)
# data.unpack_image_limit_mib, download.unpack_image_limit_mib
UNPACK_IMAGE_LIMIT = Rule(
    "a number of MiB above 0 (the most one image of an archive may unpack to)",
    lambda mib: isinstance(mib, int | float) and 0 < mib < float("inf"),
    _number,
)
# a source's download settings that bound unpacking, each beside data's of the same name
UNPACK_BOUNDS = {
    "unpack_limit_gib": UNPACK_LIMIT,
    "unpack_ratio_limit": UNPACK_RATIO_LIMIT,
    "unpack_image_limit_mib": UNPACK_IMAGE_LIMIT,
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSettings:
    """A data.sources entry of class folders (conf/data/sources/folder.yaml, metu.yaml,
    sdnet2018.yaml)."""

    settings_error = DataError
    root: str
    classes: dict[str, list[str]]  # Negative/Positive -> folder patterns under root
    subsets: list[str] | None
    split: Literal["random", "grouped", "pattern"]
    group_pattern: str | None
    group_distance: Annotated[int, GROUP_DISTANCE]
    download: dict[str, Any] | None = None

    @staticmethod
    def check_together(settings: dict, where: str) -> None:
        """The class mapping, the pattern a pattern split needs, the download's bounds."""
        if set(settings["classes"]) != set(CLASS_NAMES):
            raise DataError(
                f"{where}.classes must map exactly {' and '.join(CLASS_NAMES)} to lists of "
                f"folders (got {sorted(settings['classes'])})."
            )
        if settings["split"] == "pattern":
            if not (pattern := settings["group_pattern"]):
                raise DataError(f"{where}.split=pattern needs {where}.group_pattern (a regex).")
            try:
                re.compile(pattern)
            except re.error as err:
                raise DataError(f"{where}.group_pattern={pattern!r} is no regex: {err}") from None
        download = settings.get("download") or {}
        for key, rule in UNPACK_BOUNDS.items():
            if download.get(key) is not None:
                require(rule, download[key], f"{where}.download.{key}", DataError)


class MaskValue(str, enum.Enum):
    """What a grey level of a crack mask stands for (data.sources.NAME.mask_values)."""

    crack = "crack"
    not_crack = "not_crack"
    ignore = "ignore"


@dataclass(frozen=True)
class MasksSourceSettings:
    """A data.sources entry of photos with crack masks (conf/data/sources/masks.yaml), cut
    into labelled tiles by data/masks.py."""

    settings_error = DataError
    kind: Literal["masks"]
    root: str
    mask_dir: str | None
    mask_suffix: Annotated[
        str,
        Rule("a file-name ending such as _mask.png", lambda end: bool(end) and "/" not in end),
    ]
    tile_size: Annotated[int, at_least(1, "pixels")]
    stride: Annotated[int, at_least(1, "pixels")]
    min_share: Annotated[float, Rule("a share of a tile in (0, 1]", lambda v: 0 < v <= 1)]
    ambiguous: Annotated[
        list[float] | None,
        Rule(
            "null or [low, high] with 0 <= low < high <= 1 (tiles whose crack share lies "
            "strictly between are left out)",
            lambda band: len(band) == 2 and 0 <= band[0] < band[1] <= 1,
        ),
    ]
    mask_values: Annotated[
        dict[int, MaskValue] | None,
        Rule(
            "a mapping of grey levels 0..255 to crack, not_crack or ignore",
            lambda levels: all(0 <= level <= 255 for level in levels),
            lambda levels: str({k: v.value for k, v in levels.items()}),
        ),
    ]
    split: Annotated[
        str,
        Rule(
            "photo (the tiles of one photo always stay on one side of every split)",
            lambda split: split == "photo",
        ),
    ]
    # folders under root that are not read (conf/data/sources/masks.yaml); the default
    # for the masks sources stored in checkpoints written before the setting
    exclude: Annotated[
        list[str] | None,
        Rule(
            "null or a list of folders under root (relative paths, e.g. [Positive, Negative])",
            lambda names: all(name and not Path(name).is_absolute() for name in names),
        ),
    ] = None


def source_settings(name: str, config: Any) -> SourceSettings | MasksSourceSettings:
    """data.sources.NAME checked by its kind's settings: a masks source (`kind: masks`)
    or a folder of class folders (no kind)."""
    where, config = f"data.sources.{name}", plain(config)
    if not isinstance(config, Mapping):
        raise DataError(f"{where} must be a mapping of source settings. {SOURCE_HINT}")
    kind = config.get("kind")
    if kind not in (None, MASKS_KIND):
        raise DataError(
            f"{where}.kind={kind} must be {MASKS_KIND} (photos with crack masks) or absent "
            f"(class folders). {SOURCE_HINT}"
        )
    cls = MasksSourceSettings if kind == MASKS_KIND else SourceSettings
    required = {p.name for p in parameters_of(cls) or () if p.required}
    if missing := sorted(required - set(config)):
        raise DataError(
            f"{where} is not a known source (it lacks {', '.join(missing)}). {SOURCE_HINT}"
        )
    if config["root"] is None:
        raise DataError(f"{where}.root is not set: point it at the source's folder.")
    return settings_of(config, cls, where)


@dataclass(frozen=True)
class SourceSpec:
    """One source, checked."""

    name: str
    root: Path
    classes: dict[str, list[str]]  # Negative/Positive -> folder patterns under root
    subsets: list[str] | None
    split: str  # random, grouped, pattern or (a masks source) photo
    group_pattern: str | None
    group_distance: int
    download: dict | None = None
    shorthand: bool = False  # data.root=DIR rather than an entry of data.sources
    # a masks source's settings (photos with crack masks, cut into tiles: data/masks.py)
    tiles: MasksSourceSettings | None = None

    @classmethod
    def from_config(cls, name: str, config: Mapping) -> SourceSpec:
        """data.sources.NAME, checked by its settings class (SourceSettings, or
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
            split=settings.split,
            group_pattern=settings.group_pattern,
            group_distance=settings.group_distance,
            download=dict(settings.download) if settings.download else None,
        )

    @classmethod
    def from_root(cls, root: str | Path, split: str, group_distance: int) -> SourceSpec:
        """The one source `data.root=DIR` stands for: DIR/Negative and DIR/Positive."""
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

    def excluded(self) -> set[str]:
        """The real paths of the folders under root this source does not read (a masks
        source's `exclude`)."""
        names = self.tiles.exclude if self.tiles is not None else None
        return {os.path.realpath(self.root / name) for name in names or ()}

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


FileState = tuple[int, int]  # a file's (size in bytes, mtime_ns): the feature cache's key


class Listings:
    """Folder listings, each made once: finding a source's class folders and walking them
    read the same listing, however many steps or sources look at a folder."""

    def __init__(self) -> None:
        self._entries: dict[str, list[os.DirEntry]] = {}

    def entries(self, folder: str | Path) -> list[os.DirEntry]:
        """The folder's entries, sorted by name (OSError if it cannot be listed)."""
        key = os.fspath(folder)
        if key not in self._entries:
            with os.scandir(key) as found:
                self._entries[key] = sorted(found, key=lambda entry: entry.name)
        return self._entries[key]


def _subfolders(root: Path, listings: Listings, depth: int = 2) -> list[str]:
    """Folders under root up to `depth` levels, as relative POSIX paths."""
    found, level = [], [str(root)]
    for _ in range(depth):
        level = [
            entry.path
            for parent in level
            for entry in listings.entries(parent)
            if entry.is_dir() and not entry.name.startswith(".")
        ]
        found += [Path(path).relative_to(root).as_posix() for path in level]
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


def class_folders(spec: SourceSpec, listings: Listings | None = None) -> dict[int, list[Path]]:
    """Label -> the folders its patterns match (case-insensitive globs, up to two levels
    deep), each label at least one; a missing root or a mapping that matches nothing is
    a DataError naming the source's setting."""
    if not spec.root.is_dir():
        raise _missing_root(spec)
    folders = _subfolders(spec.root, listings if listings is not None else Listings())
    result: dict[int, list[Path]] = {}
    for label, name in enumerate(CLASS_NAMES):
        patterns = [p.lower() for p in spec.patterns(name)]
        matched = [f for f in folders if any(fnmatch.fnmatchcase(f.lower(), p) for p in patterns)]
        if not matched:
            raise _no_match(spec, name, folders)
        result[label] = [spec.root / f for f in matched]
    return result


def refuse_shared_folders(sources: Sequence[SourceFiles]) -> None:
    """Two sources must not read the same folder (the same root twice, or one source's
    class folder inside another's): every image there would count twice, once per source."""
    seen: dict[str, SourceSpec] = {}
    for files in sources:
        spec = files.spec
        folders = {os.path.realpath(folder) for folder in files.walks}
        for folder in sorted(folders):
            for other_folder, other in seen.items():
                (inner, _), (outer, outer_spec) = sorted(
                    ((folder, spec), (other_folder, other)), key=lambda item: -len(item[0])
                )
                if inside(inner, outer) and not any(
                    inside(inner, skipped) for skipped in outer_spec.excluded()
                ):
                    raise DataError(
                        f"{other.where} and {spec.where} both read {inner} (roots "
                        f"{other.root} and {spec.root}): its images would count twice. "
                        f"Remove one of them, or give them disjoint class folders "
                        f"({spec.where}.classes or .subsets)."
                    )
        seen.update(dict.fromkeys(folders, spec))


def inside(path: str, folder: str) -> bool:
    """Whether the path is the folder or lies under it (both real paths)."""
    return os.path.join(path, "").startswith(os.path.join(folder, ""))


def is_image_name(name: str | Path) -> bool:
    """Whether training reads the file: an image extension, any letter case."""
    return str(name).lower().endswith(IMG_EXTENSIONS)


NOT_REGULAR = "not a regular file or a link to one"
LOOP = "a link to a folder that holds it (a loop): not followed"


@dataclass
class Walk:
    """What one walk of a folder found."""

    folder: Path
    files: dict[str, FileState]  # regular files (or links to them), sorted by path
    others: list[tuple[str, str]]  # (entry not read, why), sorted

    def images(self) -> list[str]:
        """The image files, sorted. Entries named like images that are not read (a broken
        link, a FIFO) are named in a warning, so that nothing is left out silently
        (data.check=false runs no report)."""
        unread = [
            f"{path} ({why})" for path, why in self.others if is_image_name(os.path.basename(path))
        ]
        if unread:
            log.warning(
                "%d image name(s) under %s not read: %s",
                len(unread),
                self.folder,
                "; ".join(unread),
            )
        return [path for path in self.files if is_image_name(os.path.basename(path))]


def walk_files(
    folder: str | Path, listings: Listings | None = None, skip: Collection[str] = ()
) -> Walk:
    """The regular files under folder, sub-folders and links included (less the folders
    whose real paths are in `skip`), each with its state from the walk's own stat, and
    the other entries with why they are not read.

    Only regular files and links to them are worth reading: a FIFO or device named
    `*.jpg` would block whoever opens it. A link to a folder that holds the one walked
    (a loop) is not followed; any other real folder is walked once, through its own path
    before any link to it, and a real file reached by several paths counts once, by its
    own path if it has one. So links cannot multiply the images or walk forever.
    """
    listings = listings if listings is not None else Listings()
    start = os.path.realpath(folder)
    # real file -> (via a link, path, state)
    found: dict[tuple[int, int], tuple[bool, str, FileState]] = {}
    others: list[tuple[str, str]] = []
    walked: set[tuple[int, int]] = set()
    plain, linked = [str(folder)], []  # folders to walk: real ones first
    while plain or linked:
        top = plain.pop() if plain else linked.pop(0)
        try:
            info = os.stat(top)
            entries = listings.entries(top)
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
                    if skip and os.path.realpath(entry.path) in skip:
                        continue
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
                stat = entry.stat() if regular else None
            except OSError:
                regular = False
            if not regular:
                others.append((entry.path, NOT_REGULAR))
                continue
            key = (stat.st_dev, stat.st_ino)
            if key not in found or (link, entry.path) < found[key][:2]:
                found[key] = (link, entry.path, (stat.st_size, stat.st_mtime_ns))
    files = dict(sorted((path, state) for _, path, state in found.values()))
    return Walk(Path(folder), files, sorted(others))


def image_files(folder: Path) -> list[str]:
    """The image files under folder, sub-folders included, sorted: regular files (or links
    to them) with an image name, each real file and folder once (walk_files)."""
    return walk_files(folder).images()


@dataclass
class SourceFiles:
    """A source's files as one walk of each folder it reads found them: the run's one list
    of them, which the split, the check, the copies across sources and the feature
    cache's key all read."""

    spec: SourceSpec
    classes: dict[int, list[Path]]  # label -> its class folders; none for a masks source
    walks: dict[Path, Walk]  # every folder the source reads (a masks source: its root)

    def states(self) -> dict[str, FileState]:
        """Every file's state, as the walk found it."""
        return {path: state for walk in self.walks.values() for path, state in walk.files.items()}


def list_source(spec: SourceSpec, listings: Listings | None = None) -> SourceFiles:
    """The source's folders found and walked; a missing root or a class mapping that
    matches nothing is a DataError naming the source's setting."""
    listings = listings if listings is not None else Listings()
    if spec.tiles is not None:
        if not spec.root.is_dir():
            raise _missing_root(spec)
        walk = walk_files(spec.root, listings, spec.excluded())
        return SourceFiles(spec, {}, {spec.root: walk})
    classes = class_folders(spec, listings)
    folders = [folder for group in classes.values() for folder in group]
    return SourceFiles(spec, classes, {f: walk_files(f, listings) for f in folders})


def list_sources(specs: Sequence[SourceSpec]) -> list[SourceFiles]:
    """Every source listed, in order; a folder two of them look at is listed once."""
    listings = Listings()
    return [list_source(spec, listings) for spec in specs]


def listed(source: str | Path | SourceSpec | SourceFiles) -> SourceFiles:
    """A source's files: the listing given, or one made now (a path stands for the one
    source of data.root=PATH)."""
    if isinstance(source, SourceFiles):
        return source
    if not isinstance(source, SourceSpec):
        source = SourceSpec.from_root(source, "random", 0)
    return list_source(source)


def source_samples(files: SourceFiles) -> list[tuple[str, int]]:
    """(path, label) of every image in the source's class folders, sorted by path; every
    class folder must hold images."""
    spec = files.spec
    samples = []
    for label, folders in files.classes.items():
        for folder in folders:
            images = files.walks[folder].images()
            if not images:
                looked = f"looked for {', '.join(IMG_EXTENSIONS)} files"
                raise DataError(
                    f"Class folder {folder} holds no images ({looked}). Every class needs "
                    f"images to train on. {DATA_HINT}"
                    if spec.shorthand
                    else f"{spec.where}: class folder {folder} holds no images ({looked})."
                )
            samples += [(path, label) for path in images]
    return sorted(samples)


def scan_source(spec: SourceSpec) -> list[tuple[str, int]]:
    """(path, label) of every image in the source's class folders (source_samples)."""
    return source_samples(list_source(spec))


def scan_samples(root: str | Path) -> list[tuple[str, int]]:
    """All (image path, label) pairs under root/Negative and root/Positive."""
    return scan_source(SourceSpec.from_root(root, "random", 0))
