"""Splitting a data set's sources into train/val/test, and the manifest that records it.

Every source is scanned, checked and split on its own, with the same seed and fractions,
class by class: at random (stratified), by near-duplicate groups (`grouped`), or by a
file-name pattern (`pattern`: the regex's first group is the group, e.g. SDNET2018's
photo number before `-`; a masks source's tiles by their photo), so that crops of one
photo never straddle train and validation. The splits are concatenated: each source keeps
its share in train, val and test. data.root=DIR is one such source (data/sources.py). The
union is then checked: byte-identical copies in two sources are moved into one split, no
two sources may read one folder, and a source left without images of a class where it is
used is an error.

Near-duplicate groups (split=grouped): the METU crops were cut from 458 photos, and some
crops of one photo overlap, so a random split can put almost the same image in train and
in validation. A 64-bit difference hash (dHash: is each pixel of a 9x8 grey thumbnail
brighter than its right neighbour?) changes little under small shifts and re-encoding;
images whose hashes differ in at most `max_distance` bits are neighbours, and neighbours
of neighbours form one group (union-find). Exact duplicates have distance 0.

Finding neighbours without comparing all pairs: cut the 64 bits into max_distance + 1
bands; two hashes within max_distance bits agree exactly on at least one band
(pigeonhole), so only hashes that share a band value are compared.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from crack_lightning.data.check import require_clean
from crack_lightning.data.decode import sample_file, split_tile
from crack_lightning.data.sources import (
    GROUP_DISTANCE,
    FileState,
    SourceSpec,
    list_sources,
    refuse_shared_folders,
    source_samples,
)
from crack_lightning.errors import DataError
from crack_lightning.io import write_csv
from crack_lightning.progress import track
from crack_lightning.settings import CLASS_NAMES, Rule, require

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("source", "path", "label", "split")
HASH_BITS = 64


# data.val_fraction and data.test_fraction: shares of each class held out
VAL_FRACTION = Rule("strictly between 0 and 1", lambda share: 0 < share < 1, verb="lie")
TEST_FRACTION = Rule("in [0, 1)", lambda share: 0 <= share < 1, verb="lie")


def check_fractions(val_fraction: float, test_fraction: float, section: str = "data") -> None:
    """Fractions that leave images to train on and to validate on."""
    require(VAL_FRACTION, val_fraction, f"{section}.val_fraction", DataError)
    require(TEST_FRACTION, test_fraction, f"{section}.test_fraction", DataError)
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"{section}.val_fraction + {section}.test_fraction = "
            f"{val_fraction + test_fraction} leaves no images to train on; keep the sum below 1."
        )


def splits_class(count: int, val_fraction: float, test_fraction: float) -> bool:
    """Whether `count` images of a class split at these fractions: at least one in val,
    one in test when test_fraction > 0, and one left to train on (the splits' sizes are
    rounded: round(count * fraction))."""
    n_val, n_test = round(count * val_fraction), round(count * test_fraction)
    return n_val > 0 and (test_fraction == 0 or n_test > 0) and count - n_val - n_test > 0


def min_class_images(val_fraction: float, test_fraction: float) -> int:
    """The fewest images of a class that split at these fractions (splits_class); the
    page counts marks against it."""
    return next(n for n in range(1, 10_000) if splits_class(n, val_fraction, test_fraction))


def too_few(label: int, count: int, val_fraction: float, test_fraction: float) -> DataError:
    """The error of a class below min_class_images: how many there are and are needed."""
    needed = min_class_images(val_fraction, test_fraction)
    return DataError(
        f"Class {CLASS_NAMES[label]} has only {count} images: too few for "
        f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}, which need "
        f"at least {needed} of each class (add {needed - count} more, or lower the fractions)."
    )


def stratified_split(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Split indices class by class, so every split keeps the data set's class ratio.

    Within a class the split sizes are rounded, so each split's class ratio differs
    from the whole set's by less than one image.
    """
    check_fractions(val_fraction, test_fraction)
    rng = random.Random(seed)
    result: dict[str, list[int]] = {name: [] for name in SPLITS}
    for label in sorted(set(labels)):
        indices = [i for i, lab in enumerate(labels) if lab == label]
        rng.shuffle(indices)
        n_test = round(len(indices) * test_fraction)
        n_val = round(len(indices) * val_fraction)
        if not splits_class(len(indices), val_fraction, test_fraction):
            raise too_few(label, len(indices), val_fraction, test_fraction)
        result["test"] += indices[:n_test]
        result["val"] += indices[n_test : n_test + n_val]
        result["train"] += indices[n_test + n_val :]
    return {name: sorted(idx) for name, idx in result.items()}


def grouped_split(
    labels: Sequence[int],
    groups: Sequence[int],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    hint: str = "Lower data.group_distance or use data.split=random.",
) -> dict[str, list[int]]:
    """Like stratified_split, but all images of a group land in the same split.

    Groups are dealt out in a seeded random order; each goes to the split it overfills
    least (per class), ties to the one with the most room left relative to its target.
    With only one-image groups this meets the stratified sizes exactly; large groups make
    the sizes drift by up to a group's size. (Dealing the largest first would fit sizes
    more tightly, but then groups of distinct sizes, such as SDNET2018's photos, land in
    the same splits whatever the seed, and seeds could not cross-validate over them.)
    """
    check_fractions(val_fraction, test_fraction)
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    order = sorted(members)
    random.Random(seed).shuffle(order)

    totals = Counter(labels)
    fractions = {"test": test_fraction, "val": val_fraction}
    target = {
        name: {c: round(n * fractions[name]) for c, n in totals.items()} for name in fractions
    }
    target["train"] = {c: n - target["val"][c] - target["test"][c] for c, n in totals.items()}
    for label, n in totals.items():
        if not splits_class(n, val_fraction, test_fraction):
            raise too_few(label, n, val_fraction, test_fraction)
    candidates = SPLITS if test_fraction > 0 else ("train", "val")
    filled = {name: Counter() for name in SPLITS}
    result: dict[str, list[int]] = {name: [] for name in SPLITS}
    for group in order:
        counts = Counter(labels[i] for i in members[group])

        def cost(name: str, counts: Counter = counts) -> tuple[int, float]:
            over = sum(max(0, filled[name][c] + n - target[name][c]) for c, n in counts.items())
            room = sum(
                (target[name][c] - filled[name][c]) / max(target[name][c], 1) for c in counts
            )
            return over, -room

        best = min(candidates, key=cost)
        filled[best].update(counts)
        result[best] += members[group]
    for name in candidates:
        for label in totals:
            if filled[name][label] == 0:
                raise DataError(
                    f"The grouped split left no {CLASS_NAMES[label]} image in {name}: the "
                    f"groups are too large for these fractions. {hint}"
                )
    return {name: sorted(indices) for name, indices in result.items()}


def dhash(path: str) -> int:
    """64-bit difference hash of an image file.

    JPEGs are decoded at reduced scale (at least 32x32; 1/4 for 227 px crops), which is
    faster than a full decode. Of the variants tried on the real sample (1/8 or 1/4
    or full scale, box, bilinear or Lanczos filter) this one put the visibly overlapping
    crops closest together (4-8 bits) while unrelated crops stay about 31 bits apart.
    """
    try:
        with Image.open(path) as image:
            image.draft("L", (32, 32))
            grey = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    except Exception as err:  # PIL raises many types for bad files
        raise DataError(
            f"{path} cannot be decoded ({type(err).__name__}: {err}); run "
            f"`crack-data check root=DATA_ROOT` to list every damaged file."
        ) from None
    pixels = np.asarray(grey, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def image_hashes(paths: Sequence[str], progress: bool = True) -> np.ndarray:
    """dHash of every path, as uint64."""
    iterator = track(paths, "Hashing images", "img", progress)
    return np.array([dhash(path) for path in iterator], dtype=np.uint64)


def neighbour_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """(k, 2) index pairs i < j of distinct hashes at most max_distance bits apart."""
    require(GROUP_DISTANCE, max_distance, "data.group_distance", DataError)
    hashes = np.asarray(hashes, dtype=np.uint64)
    bands = max_distance + 1
    widths = [HASH_BITS // bands + (1 if b < HASH_BITS % bands else 0) for b in range(bands)]
    found = []
    shift = 0
    for width in widths:
        keys = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        shift += width
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
            members = order[start:end]
            found.append(_close_pairs(hashes, members, max_distance))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


def _close_pairs(hashes: np.ndarray, members: np.ndarray, max_distance: int) -> np.ndarray:
    """Pairs among members (indices into hashes) within max_distance, in row blocks."""
    pairs = []
    values = hashes[members]
    for lo in range(0, len(members), 1024):
        block = values[lo : lo + 1024]
        distance = np.bitwise_count(block[:, None] ^ values[None, :])
        rows, cols = np.nonzero(distance <= max_distance)
        rows = rows + lo
        keep = rows < cols
        a, b = members[rows[keep]], members[cols[keep]]
        pairs.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    return np.concatenate(pairs)


def near_duplicate_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Group id of each hash (0, 1, ... in order of first appearance); near ones share one."""
    unique, inverse = np.unique(np.asarray(hashes, dtype=np.uint64), return_inverse=True)
    parent = list(range(len(unique)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in neighbour_pairs(unique, max_distance).tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(len(unique))], dtype=np.int64)[inverse.ravel()]
    _, first, ids = np.unique(roots, return_index=True, return_inverse=True)
    # renumber by first appearance, so ids do not depend on hash values
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[ids.ravel()]


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


def near_duplicates(spec: SourceSpec, paths: Sequence[str]) -> list[int]:
    """Near-duplicate group of every file (perceptual hash neighbours)."""
    groups = near_duplicate_groups(image_hashes(paths), spec.group_distance).tolist()
    sizes = Counter(groups)
    log.info(
        "Grouped split: %d images in %d groups (largest %d; %d images share a group "
        "with another) at %s.group_distance=%d",
        len(groups),
        len(sizes),
        max(sizes.values()),
        sum(n for n in sizes.values() if n > 1),
        spec.where,
        spec.group_distance,
    )
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
    if spec.tiles is not None:  # a masks source: split by photo
        from crack_lightning.data.masks import photo_groups

        groups = photo_groups(paths)
        hint = f"Add photos to {spec.where}.root, or lower data.val_fraction."
    elif spec.split == "pattern":
        groups = pattern_groups(paths, spec.group_pattern, spec.where)
        hint = f"Use fewer, smaller groups in {spec.where}.group_pattern or split=random."
    else:
        groups = near_duplicates(spec, paths)
        hint = f"Lower {spec.where}.group_distance or use {spec.where}.split=random."
    try:
        return grouped_split(labels, groups, val_fraction, test_fraction, seed, hint)
    except DataError as err:
        if spec.shorthand:
            raise
        raise DataError(f"{spec.where}: {err}") from None


@dataclass
class SourceSamples:
    """Samples of all sources, which source each came from, and the combined split."""

    specs: list[SourceSpec]
    samples: list[tuple[str, int]] = field(default_factory=list)
    source: list[int] = field(default_factory=list)  # index into specs, per sample
    split: dict[str, list[int]] = field(default_factory=lambda: {name: [] for name in SPLITS})
    # every file's (size, mtime_ns) from the sources' one listing (the feature cache's key)
    states: dict[str, FileState] = field(default_factory=dict)
    # masks sources split by photo alone (load_sources' by_pixels)
    by_pixels: bool = False

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]


def load_sources(
    specs: Sequence[SourceSpec],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    check: bool,
    holdout: str | None = None,
    by_pixels: bool = False,
) -> SourceSamples:
    """Scan, check and split every source; the split's indices refer to the concatenation.

    A `holdout` source goes to the test split whole: trained on the others, tested on it
    (leave-one-source-out). Byte-identical copies in different sources are kept in one
    split (keep_copies_together), and every source must keep images of both classes
    where it is used (require_every_source). With `by_pixels` (crack maps learn from
    masks, data.targets=masks) a masks source's photos are split without regard to their
    tiles' labels: its masks hold both classes in every tile.
    """
    names = [s.name for s in specs]
    if holdout is not None and holdout not in names:
        raise DataError(
            f"data.holdout_source={holdout} is not one of the sources ({', '.join(names)})."
        )
    if holdout is not None and len(names) < 2:
        raise DataError("data.holdout_source needs at least two sources: one to train on.")
    sources = list_sources(specs)
    refuse_shared_folders(sources)
    result = SourceSamples(list(specs), by_pixels=by_pixels)
    digests: dict[str, bytes] | None = {} if check else None
    for index, files in enumerate(sources):
        spec = files.spec
        if spec.tiles is None:
            samples = source_samples(files)
        else:  # a masks source
            from crack_lightning.data.masks import tile_source

            samples = tile_source(files)
        result.states.update(files.states())
        if check:
            report = require_clean(files, samples)
            digests.update(report.digests)
            if report.duplicates:
                log.warning(
                    "%s: %d groups of identical images within a class (e.g. %s); %s",
                    spec.root,
                    len(report.duplicates),
                    " = ".join(report.duplicates[0]),
                    "split=grouped keeps each group on one side of the split"
                    if spec.tiles is None
                    else "their tiles can straddle train and val: remove the copies",
                )
        if spec.name == holdout:
            split = {"train": [], "val": [], "test": list(range(len(samples)))}
        elif by_pixels and spec.tiles is not None:
            unlabelled = [(path, 0) for path, _ in samples]
            split = split_source(spec, unlabelled, val_fraction, test_fraction, seed)
        else:
            split = split_source(spec, samples, val_fraction, test_fraction, seed)
        offset = len(result.samples)
        for name in SPLITS:
            result.split[name] += [offset + i for i in split[name]]
        result.samples += samples
        result.source += [index] * len(samples)
    if len(specs) > 1:
        keep_copies_together(result, copies_across_sources(result, digests), check, holdout)
    require_every_source(result, holdout)
    return result


def copies_across_sources(data: SourceSamples, digests: dict[str, bytes] | None) -> list[list[int]]:
    """Groups of samples (indices) that read byte-identical files in two or more sources:
    copies of a file, or every tile of copies of a masks source's photo.

    The quick check has hashed every file already (`digests`); without it only files
    whose size (from the listing) occurs in two sources are read and hashed, which is few.
    """
    files = [sample_file(path) for path, _ in data.samples]
    if digests is None:
        sizes: dict[int, set[int]] = defaultdict(set)
        for file, source in zip(files, data.source, strict=True):
            sizes[data.states[file][0] if file in data.states else -1].add(source)
        digests = {}
        for file in dict.fromkeys(files):
            size = data.states[file][0] if file in data.states else -1
            if size >= 0 and len(sizes[size]) > 1:
                with open(file, "rb") as handle:
                    digests[file] = hashlib.sha256(handle.read()).digest()
    by_digest: dict[bytes, list[int]] = defaultdict(list)
    for index, file in enumerate(files):
        if file in digests:
            by_digest[digests[file]].append(index)
    return [group for group in by_digest.values() if len({data.source[i] for i in group}) > 1]


def keep_copies_together(
    data: SourceSamples, groups: list[list[int]], check: bool, holdout: str | None
) -> None:
    """Move every group of copies into one split: the split of its first copy, or test
    when a copy is in the held-out source; copies with different labels (a file, or the
    same tile of a photo) are refused (under data.check=false, warned about)."""
    if not groups:
        return
    where = {i: name for name, indices in data.split.items() for i in indices}
    conflicts = []
    for group in groups:
        same: dict[tuple[int, int, int] | None, list[int]] = defaultdict(list)
        for i in group:
            same[split_tile(data.samples[i][0])[1]].append(i)
        conflicts += [
            alike for alike in same.values() if len({data.samples[i][1] for i in alike}) > 1
        ]
        held = [i for i in group if data.specs[data.source[i]].name == holdout]
        target = "test" if held else where[group[0]]
        for i in group:
            where[i] = target
    data.split = {name: sorted(i for i, s in where.items() if s == name) for name in SPLITS}

    def show(group: list[int]) -> str:
        return " = ".join(f"{data.specs[data.source[i]].where}:{data.samples[i][0]}" for i in group)

    if conflicts:
        message = (
            f"{len(conflicts)} image(s) are in two sources with different labels "
            f"(e.g. {show(conflicts[0])}): delete the copy in the wrong class (a tile: "
            f"fix the mask that marks it wrongly)"
        )
        if check:
            raise DataError(message + ", or set data.check=false to train anyway.")
        log.warning(message + ".")
    counts = Counter(
        (data.specs[data.source[group[0]]].where, data.specs[data.source[i]].where)
        for group in groups
        for i in group[1:]
        if data.source[i] != data.source[group[0]]
    )
    pairs = "; ".join(f"{n} of {b} are copies of images in {a}" for (a, b), n in counts.items())
    first = groups[0]
    example = [first[0], next(i for i in first if data.source[i] != data.source[first[0]])]
    log.warning(
        "Byte-identical images in more than one source (%s; e.g. %s): each group of copies "
        "is kept in one split, so none straddles train and val. Remove the copies to "
        "count each image once.",
        pairs,
        show(example),
    )


def require_every_source(
    data: SourceSamples, holdout: str | None, skipped: Sequence[str] = ()
) -> None:
    """Every source keeps images of both classes in train and val (a held-out source: in
    test), so none is silently missing from training or from the per-source metrics.
    `skipped` are damaged files left out since the split (data.on_bad_image=skip): by the
    feature cache before training, or by the loaders while it ran."""
    skipped = set(skipped)
    cells = Counter(
        (data.source[i], data.samples[i][1], name)
        for name, indices in data.split.items()
        for i in indices
        if data.samples[i][0] not in skipped
    )
    for index, spec in enumerate(data.specs):
        if data.by_pixels and spec.tiles is not None:  # every tile's mask holds both classes
            labels = [
                lab for (_, lab), s in zip(data.samples, data.source, strict=True) if s == index
            ]
            if labels and not any(labels):
                raise DataError(
                    f"{spec.where}.root={spec.root} has no crack to learn from: "
                    f"{none_of_class(spec, CLASS_NAMES[1], len(labels))}."
                )
            continue
        needed = ("test",) if spec.name == holdout else ("train", "val")
        for label, class_name in enumerate(CLASS_NAMES):
            empty = [name for name in needed if not cells[index, label, name]]
            if not empty:
                continue
            mine = [
                (path, lab)
                for (path, lab), s in zip(data.samples, data.source, strict=True)
                if s == index
            ]
            lost = [path for path, _ in mine if path in skipped]
            if lost:
                why = (
                    f"{len(lost)} of its {len(mine)} images are damaged and were skipped "
                    f"(data.on_bad_image=skip; e.g. {lost[0]}). Replace or delete them "
                    f"(`crack-data check` lists them)"
                )
            elif all(lab != label for _, lab in mine):
                why = none_of_class(spec, class_name, len(mine))
            else:
                why = "its images there are copies of another source's, kept in that one's split"
            fix = "" if spec.shorthand else f", or set {spec.where}=null to leave it out"
            raise DataError(
                f"{spec.where}.root={spec.root} has no {class_name} image left in "
                f"{' or '.join(empty)}: {why}{fix}."
            )


def none_of_class(spec: SourceSpec, class_name: str, count: int) -> str:
    """Why a source holds no image of a class at all: what its folders or masks say."""
    if spec.tiles is None:
        return f"it holds no {class_name} image"
    share = f"{spec.where}.min_share={spec.tiles.min_share}"
    if class_name == CLASS_NAMES[1]:
        return (
            f"its masks mark none of its {count} tiles as crack (every mask is empty, or no "
            f"tile reaches {share} of crack pixels)"
        )
    return f"its masks mark all of its {count} tiles as crack ({share})"


def manifest_key(data: SourceSamples, index: int) -> tuple[str, str]:
    """A sample's (source, path relative to the source's root): its manifest row's key."""
    spec = data.specs[data.source[index]]
    return spec.name, Path(data.samples[index][0]).relative_to(spec.root).as_posix()


def manifest_rows(data: SourceSamples) -> list[tuple[str, str, str, str]]:
    """Every image as a manifest row (MANIFEST_COLUMNS), sorted."""
    rows = [
        (*manifest_key(data, i), CLASS_NAMES[data.samples[i][1]], name)
        for name, indices in data.split.items()
        for i in indices
    ]
    return sorted(rows)


def write_manifest(path: Path, data: SourceSamples) -> None:
    """CSV of every image: its source, its path relative to that source's root, its class
    and its split, sorted; the one record of which file went where."""
    write_csv(path, MANIFEST_COLUMNS, manifest_rows(data))
