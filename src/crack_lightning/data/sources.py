"""Several labelled data sources trained on at once, each split on its own.

A source (conf/data/sources/*.yaml, set under `data.sources.NAME`) names a root folder,
the class folders under it that hold cracked (Positive) and uncracked (Negative) images,
and how to split it: at random (stratified), by near-duplicate groups (`grouped`), or by
a file-name pattern (`pattern`: the regex's first group is the group, e.g. SDNET2018's
photo number before `-`), so that crops of one photo never straddle train and
validation. Every source is split with the same seed and fractions, class by class, and
the splits are concatenated: each source keeps its share in train, val and test.
"""

from __future__ import annotations

import csv
import fnmatch
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import WeightedRandomSampler
from torchvision.datasets.folder import IMG_EXTENSIONS

from crack_lightning.data.check import require_clean
from crack_lightning.data.grouping import check_distance, image_hashes, near_duplicate_groups
from crack_lightning.data.layout import CLASS_NAMES
from crack_lightning.data.splits import SPLITS, grouped_split, stratified_split
from crack_lightning.errors import DataError

SOURCE_SPLITS = ("random", "grouped", "pattern")
SOURCE_KEYS = {"root", "classes", "subsets", "split", "group_pattern", "group_distance"}
OPTIONAL_KEYS = {"download"}
SOURCE_HINT = (
    "Add a source from a shipped config with `+data/sources@data.sources.NAME=folder` "
    "(or metu, sdnet2018) and set data.sources.NAME.root=DIR."
)


@dataclass(frozen=True)
class SourceSpec:
    """One entry of data.sources, checked."""

    name: str
    root: Path
    classes: dict[str, list[str]]  # Negative/Positive -> folder patterns under root
    subsets: list[str] | None
    split: str
    group_pattern: str | None
    group_distance: int
    download: dict | None = None

    @classmethod
    def from_config(cls, name: str, config: Mapping) -> SourceSpec:
        where = f"data.sources.{name}"
        if not isinstance(config, Mapping):
            raise DataError(f"{where} must be a mapping of source settings. {SOURCE_HINT}")
        missing = SOURCE_KEYS - set(config)
        if missing:
            raise DataError(
                f"{where} is not a known source (it lacks {', '.join(sorted(missing))}). "
                f"{SOURCE_HINT}"
            )
        unknown = set(config) - SOURCE_KEYS - OPTIONAL_KEYS
        if unknown:
            raise DataError(
                f"{where} has unknown settings {sorted(unknown)}; a source takes "
                f"{', '.join(sorted(SOURCE_KEYS | OPTIONAL_KEYS))}."
            )
        if config["root"] is None:
            raise DataError(f"{where}.root is not set: point it at the source's folder.")
        classes = config["classes"]
        if not isinstance(classes, Mapping) or set(classes) != set(CLASS_NAMES):
            raise DataError(
                f"{where}.classes must map exactly {' and '.join(CLASS_NAMES)} to lists of "
                f"folders (got {sorted(classes) if isinstance(classes, Mapping) else classes})."
            )
        if config["split"] not in SOURCE_SPLITS:
            raise DataError(
                f"{where}.split={config['split']} must be one of {', '.join(SOURCE_SPLITS)}."
            )
        pattern = config["group_pattern"]
        if config["split"] == "pattern":
            if not pattern:
                raise DataError(f"{where}.split=pattern needs {where}.group_pattern (a regex).")
            try:
                re.compile(pattern)
            except re.error as err:
                raise DataError(f"{where}.group_pattern={pattern!r} is no regex: {err}") from None
        if config["split"] == "grouped":
            check_distance(config["group_distance"])
        subsets = config["subsets"]
        return cls(
            name=name,
            root=Path(config["root"]),
            classes={label: [str(p) for p in classes[label]] for label in CLASS_NAMES},
            subsets=[str(s) for s in subsets] if subsets is not None else None,
            split=config["split"],
            group_pattern=pattern,
            group_distance=int(config["group_distance"]),
            download=dict(config["download"]) if config.get("download") else None,
        )

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


def _subfolders(root: Path, depth: int = 2) -> list[str]:
    """Folders under root up to `depth` levels, as relative POSIX paths."""
    found, level = [], [root]
    for _ in range(depth):
        level = [p for parent in level for p in sorted(parent.iterdir()) if p.is_dir()]
        found += [p.relative_to(root).as_posix() for p in level if not p.name.startswith(".")]
    return found


def class_folders(spec: SourceSpec) -> dict[int, list[Path]]:
    """Label -> the folders its patterns match (case-insensitive globs), each label at
    least one; a missing root or a mapping that matches nothing is a DataError."""
    where = f"data.sources.{spec.name}"
    if not spec.root.is_dir():
        raise DataError(
            f"{where}.root={spec.root} is not a folder. Point it at the source's images "
            f"(folders {', '.join(spec.classes['Positive'] + spec.classes['Negative'])})."
        )
    folders = _subfolders(spec.root)
    result: dict[int, list[Path]] = {}
    for label, name in enumerate(CLASS_NAMES):
        patterns = [p.lower() for p in spec.patterns(name)]
        matched = [f for f in folders if any(fnmatch.fnmatchcase(f.lower(), p) for p in patterns)]
        if not matched:
            raise DataError(
                f"{where}.classes.{name}={spec.patterns(name)} matches no folder under "
                f"{spec.root} (it has {', '.join(folders[:12]) or 'no folders'}). Fix the "
                f"mapping, {where}.subsets, or {where}.root."
            )
        result[label] = [spec.root / f for f in matched]
    return result


def scan_source(spec: SourceSpec) -> list[tuple[str, int]]:
    """(path, label) of every image in the source's class folders, sorted by path."""
    samples = []
    for label, folders in class_folders(spec).items():
        for folder in folders:
            files = [p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS]
            if not files:
                raise DataError(
                    f"data.sources.{spec.name}: class folder {folder} holds no images "
                    f"(looked for {', '.join(IMG_EXTENSIONS)} files)."
                )
            samples += [(str(p), label) for p in files]
    return sorted(samples)


def pattern_groups(paths: Sequence[str], pattern: str, where: str) -> list[int]:
    """Group id per file: files whose names give the same first regex group share one."""
    regex = re.compile(pattern)
    ids: dict[str, int] = {}
    groups = []
    for path in paths:
        match = regex.search(Path(path).name)
        if match is None:
            raise DataError(
                f"{where}.group_pattern={pattern!r} does not match the file name {path}; "
                f"fix the pattern or use {where}.split=grouped (near duplicates) or random."
            )
        key = match.group(1) if regex.groups else match.group(0)
        groups.append(ids.setdefault(key, len(ids)))
    return groups


def split_source(
    spec: SourceSpec,
    samples: Sequence[tuple[str, int]],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[int]]:
    """The source's own stratified (and, if asked, grouped) split, indices into samples."""
    labels = [label for _, label in samples]
    paths = [path for path, _ in samples]
    if spec.split == "random":
        return stratified_split(labels, val_fraction, test_fraction, seed)
    if spec.split == "pattern":
        groups = pattern_groups(paths, spec.group_pattern, f"data.sources.{spec.name}")
    else:
        groups = near_duplicate_groups(image_hashes(paths), spec.group_distance).tolist()
    try:
        return grouped_split(labels, groups, val_fraction, test_fraction, seed)
    except DataError as err:
        raise DataError(f"data.sources.{spec.name}: {err}") from None


@dataclass
class SourceSamples:
    """Samples of all sources, which source each came from, and the combined split."""

    names: list[str]
    roots: list[Path]
    samples: list[tuple[str, int]]
    source: list[int]  # index into names, per sample
    split: dict[str, list[int]]

    def write_manifest(self, path: Path) -> None:
        """CSV of every image (relative to its source's root), source, class and split."""
        rows = [
            (
                self.names[self.source[i]],
                Path(self.samples[i][0]).relative_to(self.roots[self.source[i]]).as_posix(),
                CLASS_NAMES[self.samples[i][1]],
                name,
            )
            for name, indices in self.split.items()
            for i in indices
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["source", "path", "label", "split"])
            writer.writerows(sorted(rows))


def _plain_layout(spec: SourceSpec) -> bool:
    """Whether the source is laid out as ROOT/Negative, ROOT/Positive (what the file
    check of data/check.py reads); other layouts are not checked before training."""
    return all(
        len(folders) == 1
        and folders[0].parent == spec.root
        and folders[0].name.lower() == CLASS_NAMES[label].lower()
        for label, folders in class_folders(spec).items()
    )


def load_sources(
    config: Mapping,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    check: bool,
    holdout: str | None = None,
) -> SourceSamples:
    """Scan, check and split every source; the split's indices refer to the concatenation.

    A `holdout` source goes to the test split whole: trained on the others, tested on it
    (leave-one-source-out).
    """
    specs = parse_sources(config)
    names = [s.name for s in specs]
    if holdout is not None and holdout not in names:
        raise DataError(
            f"data.holdout_source={holdout} is not one of the sources ({', '.join(names)})."
        )
    if holdout is not None and len(names) < 2:
        raise DataError("data.holdout_source needs at least two sources: one to train on.")
    result = SourceSamples([s.name for s in specs], [s.root for s in specs], [], [], {})
    result.split = {name: [] for name in SPLITS}
    for index, spec in enumerate(specs):
        samples = scan_source(spec)
        if check and _plain_layout(spec):
            require_clean(spec.root, samples)
        if spec.name == holdout:
            split = {"train": [], "val": [], "test": list(range(len(samples)))}
        else:
            split = split_source(spec, samples, val_fraction, test_fraction, seed)
        offset = len(result.samples)
        for name in SPLITS:
            result.split[name] += [offset + i for i in split[name]]
        result.samples += samples
        result.source += [index] * len(samples)
    return result


def balanced_sampler(
    labels: Sequence[int], sources: Sequence[int], seed: int
) -> WeightedRandomSampler:
    """Draws (with replacement, one epoch = as many draws as images) so that every
    source x class cell is equally likely, however many images it holds."""
    cells = list(zip(sources, labels, strict=True))
    sizes = Counter(cells)
    weights = torch.tensor([1.0 / sizes[cell] for cell in cells], dtype=torch.double)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, len(cells), replacement=True, generator=generator)
