"""What is wrong with a data set on disk: `crack-data check root=ROOT`, or every source of
a data config (`crack-data check +data/sources@data.sources.NAME=sdnet2018 ...`).

Two depths. The quick check reads every file's bytes once (seconds for the whole METU
set; docs/data.md): the layout, counts, files that are empty, are
no image at all or are cut short (JPEG without its end marker, PNG without IEND), and
identical files, within a class (duplicates), across classes (label conflicts) or
across sources (copies; check_sources). The
full check also decodes every image with PIL and reports
sizes and colour modes. `train.py` runs the quick one (data.check=true) on every source,
whatever its layout: the files checked are the ones data/sources.py finds. A masks
source's report checks its photos and every photo's mask, and counts its tiles.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from crack_lightning.data.decode import load_rgb
from crack_lightning.data.sources import (
    SourceFiles,
    SourceSpec,
    list_sources,
    listed,
    refuse_shared_folders,
    source_samples,
)
from crack_lightning.errors import DataError
from crack_lightning.progress import track
from crack_lightning.settings import CLASS_NAMES

# file signatures of the formats ImageFolder accepts (by extension)
SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"P5": "PGM",
    b"P6": "PPM",
    b"RIFF": "WEBP",
}
SHOW = 10  # listed entries per kind of problem
# below this (grey levels), an image is too uniform to be a photo: flat, or damaged
MIN_BLOCK_CONTRAST = 0.5


@dataclass
class Report:
    """Findings about one source. `errors` would corrupt training; the rest inform."""

    root: Path
    name: str | None = None  # the source's name; None for data.root
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # "path: what is wrong"
    ignored: list[str] = field(default_factory=list)  # files training skips (no image name)
    duplicates: list[list[str]] = field(default_factory=list)  # identical files, one class
    conflicts: list[list[str]] = field(default_factory=list)  # identical files, both classes
    copies: list[list[str]] = field(default_factory=list)  # identical files, an earlier source
    sizes: Counter = field(default_factory=Counter)  # "WxH" -> images (full check)
    modes: Counter = field(default_factory=Counter)  # PIL mode -> images (full check)
    full: bool = False
    digests: dict[str, bytes] = field(default_factory=dict)  # path -> sha256 of its bytes
    photos: int | None = None  # a masks source's photos (counts are then of tiles)
    ignored_tiles: int = 0  # a masks source's tiles left out (ambiguous, ignore pixels)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.conflicts

    def problems(self) -> list[str]:
        """One line per problem that would corrupt training."""
        lines = list(self.errors)
        lines += [f"same image in both classes: {' = '.join(group)}" for group in self.conflicts]
        return lines

    def summary(self) -> str:
        total = sum(self.counts.values())
        counts = ", ".join(f"{n:,} {name}" for name, n in self.counts.items())
        what = f"Source {self.name} ({self.root})" if self.name else f"Data set {self.root}"
        lines = [f"{what}: {total:,} images ({counts})."]
        if self.photos is not None:
            lines = [
                f"{what}: {self.photos:,} photos with masks, {total:,} tiles ({counts}); "
                f"{self.ignored_tiles:,} tiles left out (ambiguous crack share or ignore "
                f"pixels)."
            ]
        if self.full:
            lines.append(f"Sizes: {_top(self.sizes)}. Modes: {_top(self.modes)}.")
        tiles = self.photos is not None
        sections = (
            (
                "Unreadable photos, missing or unusable masks (training would fail)"
                if tiles
                else "Unreadable, truncated or not images (training would fail)",
                self.errors,
            ),
            (
                "Label conflicts: identical files in both classes (contradictory labels)",
                [" = ".join(g) for g in self.conflicts],
            ),
            (
                "Identical photos (their tiles can straddle train and val: remove the copies)"
                if tiles
                else "Exact duplicates within a class (they can straddle train and val; "
                "data.split=grouped keeps them together)",
                [" = ".join(g) for g in self.duplicates],
            ),
            (
                "Identical files in an earlier source (training keeps each group in one split; "
                "remove them to count each image once)",
                [" = ".join(g) for g in self.copies],
            ),
            (
                "Files that are neither photos nor masks (training ignores them)"
                if tiles
                else "Files without an image extension (training ignores them)",
                self.ignored,
            ),
        )
        for title, items in sections:
            if items:
                lines.append(f"{title}: {len(items):,}")
                lines += [f"  {item}" for item in items[:SHOW]]
                if len(items) > SHOW:
                    lines.append(f"  ... and {len(items) - SHOW:,} more")
        problems = len(self.problems())
        if problems:
            lines.append(f"FAILED: {problems:,} problems would corrupt training.")
        else:
            lines.append(
                "OK: nothing that would corrupt training."
                + (
                    ""
                    if self.full
                    else (" (quick check: images were not decoded; `check` does that)")
                )
            )
        return "\n".join(lines)


def _top(counter: Counter, n: int = 5) -> str:
    items = [f"{key} x{count:,}" for key, count in counter.most_common(n)]
    if len(counter) > n:
        items.append(f"{len(counter) - n} more")
    return ", ".join(items) or "none"


def file_problem(data: bytes) -> str | None:
    """Why these bytes are no usable image, judged without decoding; None if they look whole."""
    if not data:
        return "empty file"
    kind = next((k for sig, k in SIGNATURES.items() if data.startswith(sig)), None)
    if kind is None:
        return f"not an image (starts with {data[:12]!r})"
    if kind == "JPEG" and b"\xff\xd9" not in data[-1024:]:
        return "truncated JPEG (no end-of-image marker)"
    if kind == "PNG" and b"IEND" not in data[-32:]:
        return "truncated PNG (no IEND chunk)"
    return None


def decode_problem(path: str) -> tuple[str | None, str | None, str | None]:
    """(problem, "WxH", mode) after decoding the whole image as training does."""
    try:
        with Image.open(path) as image:
            size, mode = f"{image.width}x{image.height}", image.mode
        rgb = load_rgb(path)
    except Exception as err:  # PIL raises many types for bad files
        return f"cannot be decoded ({err})", None, None
    contrast = block_contrast(rgb)
    if contrast < MIN_BLOCK_CONTRAST:
        return (
            (
                f"suspiciously uniform (8x8 block means vary by {contrast:.2f} grey levels; "
                f"e.g. a JPEG whose image data was zeroed decodes to flat grey)"
            ),
            size,
            mode,
        )
    return None, size, mode


def block_contrast(image: Image.Image) -> float:
    """Standard deviation of the image's 8x8 block means (grey levels): near zero for a
    flat image, or one whose JPEG blocks all decode alike, whatever the texture inside."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    h, w = grey.shape[0] // 8 * 8, grey.shape[1] // 8 * 8
    if not h or not w:
        return float(grey.std())
    blocks = grey[:h, :w].reshape(h // 8, 8, w // 8, 8).mean(axis=(1, 3))
    return float(blocks.std())


def check_dataset(
    source: str | Path | SourceSpec | SourceFiles,
    full: bool = True,
    progress: bool = True,
    samples: Sequence[tuple[str, int]] | None = None,
) -> Report:
    """Inspect a source's class folders file by file (a path: data.root's one source; its
    listing when the caller has one); layout errors raise DataError.

    `samples` are the source's (path, label) pairs when the caller has found them already.
    """
    files = listed(source)
    spec = files.spec
    if spec.tiles is not None:
        return check_masks_source(files, full, progress, samples)
    root = spec.root
    if samples is None:
        samples = source_samples(files)  # the exact files training would read
    report = Report(root=root, name=None if spec.shorthand else spec.name, full=full)
    report.counts = {name: 0 for name in CLASS_NAMES}
    for _, label in samples:
        report.counts[CLASS_NAMES[label]] += 1
    image_paths = {path for path, _ in samples}
    for walk in files.walks.values():  # the finder's own walk: loops walked once
        for path in walk.files:
            if not os.path.basename(path).startswith(".") and path not in image_paths:
                report.ignored.append(_rel(path, root))
        for path, why in walk.others:
            if not os.path.basename(path).startswith("."):
                report.ignored.append(f"{_rel(path, root)} ({why})")
    report.ignored.sort()

    by_hash: dict[bytes, list[tuple[str, int]]] = defaultdict(list)
    desc = "Checking images" if full else "Checking files"
    for path, label in track(samples, desc, "img", progress):
        if (digest := check_file(path, report)) is not None:
            by_hash[digest].append((path, label))
    _copies_within(report, by_hash)
    return report


def check_file(path: str, report: Report) -> bytes | None:
    """Read (and in a full check decode) one image file, adding what is wrong with it, or
    its size and mode, to the report; the sha256 of its bytes if it is usable."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        report.errors.append(f"{_rel(path, report.root)}: cannot be read ({err.strerror})")
        return None
    problem = file_problem(data)
    size = mode = None
    if problem is None and report.full:
        problem, size, mode = decode_problem(path)
    if problem:
        report.errors.append(f"{_rel(path, report.root)}: {problem}")
        return None
    if report.full:
        report.sizes[size] += 1
        report.modes[mode] += 1
    digest = hashlib.sha256(data).digest()
    report.digests[path] = digest
    return digest


def _copies_within(report: Report, by_hash: dict[bytes, list[tuple[str, int]]]) -> None:
    """Identical files of one source: duplicates (one label) or label conflicts."""
    root = report.root
    for group in by_hash.values():
        if len(group) < 2:
            continue
        names = sorted(_rel(path, root) for path, _ in group)
        if len({label for _, label in group}) > 1:
            report.conflicts.append(names)
        else:
            report.duplicates.append(names)
    report.conflicts.sort()
    report.duplicates.sort()


def check_masks_source(
    files: SourceFiles,
    full: bool = True,
    progress: bool = True,
    samples: Sequence[tuple[str, int]] | None = None,
) -> Report:
    """A masks source's report: every photo's file as check_dataset checks images, every
    photo's mask found, checked and cut into tiles (a missing or unusable mask is one
    error line naming it), and the counts of crack, not-crack and left-out tiles.

    `samples` are its tiles when the caller has labelled them already (training's quick
    check): the masks were checked then, and are not read again."""
    from crack_lightning.data.masks import find_photos, photo_tiles  # masks sources only

    spec = files.spec
    report = Report(root=spec.root, name=spec.name, full=full)
    report.counts = {name: 0 for name in CLASS_NAMES}
    photos = find_photos(files)
    report.photos = len(photos)
    suffix = spec.tiles.mask_suffix.lower()
    walk = files.walks[spec.root]
    used = set(photos)
    report.ignored = sorted(
        [_rel(p, spec.root) for p in walk.files if p not in used and not p.lower().endswith(suffix)]
        + [f"{_rel(p, spec.root)} ({why})" for p, why in walk.others]
    )
    by_hash: dict[bytes, list[tuple[str, int]]] = defaultdict(list)
    desc = "Checking photos and masks" if samples is None else "Checking photos"
    for photo in track(photos, desc, "photo", progress):
        if (digest := check_file(photo, report)) is None:
            continue
        by_hash[digest].append((photo, 0))
        if samples is not None:
            continue
        try:
            tiles = photo_tiles(spec, photo)
        except DataError as err:
            report.errors.append(str(err))
            continue
        report.ignored_tiles += tiles.ignored
        for _, label in tiles.samples:
            report.counts[CLASS_NAMES[label]] += 1
    for _, label in samples or ():
        report.counts[CLASS_NAMES[label]] += 1
    _copies_within(report, by_hash)
    return report


def check_sources(
    specs: Sequence[SourceSpec], full: bool = True, progress: bool = True
) -> list[Report]:
    """Every source's report, duplicates looked for across their union: a file identical
    to one of an earlier source is listed in the later source's report, among its copies
    (training keeps them in one split) or, with the other label, its conflicts. A masks
    source's photos are compared whole: their copies are listed, and training compares
    the labels of their tiles."""
    sources = list_sources(specs)
    refuse_shared_folders(sources)
    reports, first = [], {}  # digest -> (label, "source:path") of its first copy
    for files in sources:
        spec = files.spec
        if spec.tiles is not None:
            report = check_masks_source(files, full=full, progress=progress)
            samples: list[tuple[str, int | None]] = [(path, None) for path in report.digests]
        else:
            samples = source_samples(files)
            report = check_dataset(files, full=full, progress=progress, samples=samples)
        mine = {}
        for path, label in samples:
            digest = report.digests.get(path)
            if digest is None:
                continue
            if digest in first:
                other_label, other = first[digest]
                pair = [other, _rel(path, spec.root)]
                differ = None not in (label, other_label) and other_label != label
                (report.conflicts if differ else report.copies).append(pair)
            else:
                mine.setdefault(digest, (label, f"{spec.name}:{_rel(path, spec.root)}"))
        first = mine | first
        report.conflicts.sort()
        report.copies.sort()
        reports.append(report)
    return reports


def _rel(path: str, root: Path) -> str:
    prefix = os.path.join(root, "")  # plain string work: pathlib costs seconds at 40,000
    if path.startswith(prefix):
        return path[len(prefix) :].replace(os.sep, "/")
    return Path(path).relative_to(root).as_posix()


def require_clean(files: SourceFiles, samples: Sequence[tuple[str, int]] | None = None) -> Report:
    """The quick check of a source's listing, raising DataError on problems that would
    corrupt training."""
    spec = files.spec
    report = check_dataset(files, full=False, progress=False, samples=samples)
    problems = report.problems()
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        command = (
            f"`crack-data check root={spec.root}`"
            if spec.shorthand
            else "`crack-data check` with the same data.sources settings"
        )
        raise DataError(
            f"{spec.where}.root={spec.root} has {len(problems)} problem(s) that would corrupt "
            f"training: {shown}. See the full report with {command}; delete or fix those "
            f"files (for a label conflict, the copy in the wrong class), or set "
            f"data.check=false to train anyway."
        )
    return report
