"""Crack masks: where a photo's mask is, reading it with checks, and when a tile of the
photo counts as cracked. Scan evaluation (crack-scan-eval) and photos-with-masks sources
share these, so a tile is labelled by one rule everywhere.

A photo's mask is `PHOTO_mask.png` beside it: white = crack, black = not crack. It is
decoded as photos are (data/decode.py: fully, EXIF orientation applied, transparency shown
over white, so save masks without transparency). A mask of the photo's size is used as is;
one of the same aspect ratio but another size (e.g. 256x256 for a 768x768 photo) is scaled
to the photo's size (nearest neighbour, so it stays black and white); any other size is an
error, never a stretch. A file that is not a black-and-white image (colour, or grey levels
spread like a photo's) is refused, so a photo given by mistake is not read as a mask.
A masks source may name a mask folder and another suffix, and map grey levels to crack,
not crack or ignore (mask_classes); tiles are placed as a scan's windows (tile_boxes).

A masks source (`+data/sources@data.sources.NAME=masks`, conf/data/sources/masks.yaml)
cuts every photo under its root into such tiles (tile_source). A tile is a sample string
`PHOTO#x,y,size` (data/decode.py), so splitting, the manifest, decoding and the feature
cache treat tiles like files; the split keeps every photo's tiles on one side
(photo_groups).

What a crack map learns from each sample (data.targets=masks): a tile of a masks
source brings its crop of the photo's mask; a crop of a folder source brings what its label
says: not crack, an empty mask; crack, only that a crack is somewhere in it (every pixel
UNKNOWN, label 1: the loss asks its strongest pixel to be crack, models/segmenter.py).

Masks are read, checked and fitted to their photos by the one reader above, and cut
and resized (nearest) exactly as the image's tile is (data/decode.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from crack_lightning.data.decode import (
    DecodedImages,
    OnBadImage,
    load_rgb,
    oriented_size,
    sample_file,
    split_tile,
    tile_sample,
)
from crack_lightning.data.sources import (
    IMG_EXTENSIONS,
    SourceFiles,
    SourceSpec,
    image_files,
    listed,
)
from crack_lightning.data.transforms import UNKNOWN_PIXEL as UNKNOWN
from crack_lightning.errors import DataError, UnreadableImage

MASK_SUFFIX = "_mask.png"
# grey levels above this are crack (white), the others not crack (black)
CRACK_LEVEL = 127
# a pixel whose colour channels differ by more than this is coloured, not grey
COLOUR_TOLERANCE = 32
# a mask's pixels (anti-aliased edges and compression noise aside) take a few grey levels:
# at least MAIN_SHARE of them one of its MAIN_LEVELS most common ones; a photo's do not
MAIN_LEVELS = 8
MAIN_SHARE = 0.95  # photos of ../shared: at most 0.85
# tile labels from tile_is_crack
NOT_CRACK, CRACK, IGNORE = 0, 1, -1

HOW = "a crack mask is a black-and-white PNG (white = crack) named PHOTO_mask.png"


def mask_path(
    photo: Path, suffix: str = MASK_SUFFIX, folder: Path | None = None, root: Path | None = None
) -> Path:
    """Where a photo's mask is expected: PHOTO_mask.png (PHOTO + suffix) beside it, or,
    with a mask folder, at the photo's place under root mirrored into that folder."""
    photo = Path(photo)
    if folder is None:
        return photo.with_name(photo.stem + suffix)
    relative = photo.relative_to(root) if root is not None else Path(photo.name)
    return Path(folder) / relative.parent / (photo.stem + suffix)


def find_mask(
    photo: Path, suffix: str = MASK_SUFFIX, folder: Path | None = None, root: Path | None = None
) -> Path:
    """The photo's mask file (a regular file: a FIFO or folder of that name would hang or
    fail later), or a DataError naming the photo and the path expected."""
    path = mask_path(Path(photo), suffix, folder, root)
    if not path.is_file():
        raise DataError(f"No crack mask for {photo}: expected {path} ({HOW}).")
    return path


def read_mask(path: Path, photo: Path) -> np.ndarray:
    """The mask's grey levels, uint8 (height, width) at its own size, checked to be a mask;
    DataError naming the mask (and its photo) if it cannot be read or is not a mask."""
    where = f"Crack mask {path} (of {photo})"
    try:
        image = load_rgb(path)
    except UnreadableImage as err:
        raise DataError(f"{where} cannot be read: {err}; {HOW}.") from None
    rgb = np.asarray(image, dtype=np.int16)
    coloured = int((rgb.max(axis=2) - rgb.min(axis=2) > COLOUR_TOLERANCE).sum())
    if coloured:
        raise DataError(
            f"{where} is in colour ({coloured} of its {rgb.shape[0] * rgb.shape[1]} pixels): "
            f"is it a photo? {HOW}."
        )
    grey = np.asarray(image.convert("L"))
    counts = np.sort(np.unique(grey, return_counts=True)[1])
    main = counts[-MAIN_LEVELS:].sum() / grey.size
    if main < MAIN_SHARE:
        raise DataError(
            f"{where} has {len(counts)} grey levels spread like a photo's (its "
            f"{MAIN_LEVELS} most common cover {main:.0%} of it): is it a photo? {HOW} "
            f"(save soft-edged masks thresholded to black and white)."
        )
    return grey


def fit_to_photo(grey: np.ndarray, path: Path, photo: Path, size: tuple[int, int]) -> np.ndarray:
    """The mask at the photo's size (width, height): scaled (nearest) when it has the
    photo's aspect ratio up to a mask pixel; a DataError naming both files and both sizes
    otherwise, rather than a silent stretch."""
    width, height = size
    mask_height, mask_width = grey.shape
    if (mask_width, mask_height) == (width, height):
        return grey
    if abs(mask_width * height - mask_height * width) > max(width, height):
        raise DataError(
            f"Crack mask {path} is {mask_width}x{mask_height} but its photo {photo} is "
            f"{width}x{height}: a mask must have its photo's size or aspect ratio (it is "
            f"then scaled)."
        )
    return np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.NEAREST))


def load_mask(photo: Path, size: tuple[int, int]) -> np.ndarray:
    """Boolean (height, width) crack mask of a photo of `size` (width, height), found,
    checked and fitted as above."""
    path = find_mask(photo)
    return fit_to_photo(read_mask(path, photo), path, photo, size) > CRACK_LEVEL


def mask_classes(grey: np.ndarray, values: Mapping[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """(crack, ignore) boolean masks from a mask's grey levels: a level named in `values`
    (grey level -> crack, not_crack or ignore) stands for that; any other level is crack
    above CRACK_LEVEL (white) and not crack below."""
    crack = grey > CRACK_LEVEL
    ignore = np.zeros_like(crack)
    for level, meaning in values.items():
        at = grey == level
        meaning = getattr(meaning, "value", meaning)
        crack[at] = meaning == "crack"
        ignore[at] = meaning == "ignore"
    return crack, ignore


def window_starts(length: int, patch: int, stride: int) -> list[int]:
    """Start offsets covering [0, length): every stride, plus one flush with the far edge."""
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def tile_boxes(width: int, height: int, tile_size: int, stride: int) -> np.ndarray:
    """(N, 2) top-left x, y of the tiles covering a width x height photo, row by row (the
    windows of a scan; the last of each row and column flush with the edge)."""
    return np.array(
        [
            (x, y)
            for y in window_starts(height, tile_size, stride)
            for x in window_starts(width, tile_size, stride)
        ],
        dtype=np.int64,
    ).reshape(-1, 2)


def crack_shares(mask: np.ndarray, boxes: np.ndarray, tile_size: int) -> np.ndarray:
    """The share of crack pixels in each tile_size tile at (x, y) in boxes (the part of a
    tile inside the mask where it reaches past an edge)."""
    mask = np.asarray(mask, dtype=bool)
    return np.array(
        [mask[y : y + tile_size, x : x + tile_size].mean() for x, y in boxes], dtype=float
    ).reshape(len(boxes))


def tile_is_crack(
    mask: np.ndarray,
    boxes: np.ndarray,
    tile_size: int,
    min_share: float,
    ambiguous: tuple[float, float] | None = None,
    ignore: np.ndarray | None = None,
) -> np.ndarray:
    """Each tile's label (int8): CRACK when at least min_share of it is crack in the mask,
    else NOT_CRACK; with `ambiguous=(low, high)`, tiles whose share lies strictly between
    the two are IGNORE (too little crack to call cracked, too much to call clean). With
    an `ignore` mask (pixels of unknown class, mask_classes), a tile that is not cracked
    but holds any of them is IGNORE too: they could hide a crack.
    Scan evaluation scores patches with it; a masks source labels its tiles with it."""
    shares = crack_shares(mask, boxes, tile_size)
    labels = np.where(shares >= min_share, CRACK, NOT_CRACK).astype(np.int8)
    if ambiguous is not None:
        low, high = ambiguous
        labels[(shares > low) & (shares < high)] = IGNORE
    if ignore is not None:
        unknown = crack_shares(ignore, boxes, tile_size) > 0
        labels[unknown & (labels == NOT_CRACK)] = IGNORE
    return labels


# --- a masks source: photos with crack masks, cut into labelled tiles ---------------


@dataclass
class PhotoTiles:
    """One photo's labelled tiles, and how many were left out (IGNORE)."""

    samples: list[tuple[str, int]]
    ignored: int


def photos_in(root: Path, suffix: str = MASK_SUFFIX, mask_dir: str | None = None) -> list[str]:
    """The photos under root (the one finder), less its masks (names ending in suffix) and
    anything under mask_dir."""
    return _photos(image_files(root), suffix, mask_dir)


def _photos(images: list[str], suffix: str, mask_dir: str | None) -> list[str]:
    suffix = suffix.lower()
    masks = os.path.join(os.path.realpath(mask_dir), "") if mask_dir else None
    return [
        path
        for path in images
        if not path.lower().endswith(suffix)
        and not (masks and os.path.realpath(path).startswith(masks))
    ]


def find_photos(files: SourceFiles) -> list[str]:
    """The photos of a masks source: the images of its listing, less its masks (names
    ending in mask_suffix) and anything under mask_dir; none is an error."""
    spec, settings = files.spec, files.spec.tiles
    if settings.mask_dir is not None and not Path(settings.mask_dir).is_dir():
        raise DataError(
            f"{spec.where}.mask_dir={settings.mask_dir} is not a folder: point it at the "
            f"masks' folder, or set it to null for masks beside their photos."
        )
    photos = _photos(files.walks[spec.root].images(), settings.mask_suffix, settings.mask_dir)
    if not photos:
        raise DataError(
            f"{spec.where}.root={spec.root} holds no photos (looked for "
            f"{', '.join(IMG_EXTENSIONS)} files not named *{settings.mask_suffix}). Point it "
            f"at a folder of photos with PHOTO{settings.mask_suffix} beside each."
        )
    return photos


def source_mask_file(spec: SourceSpec, photo: str | Path) -> Path:
    """A masks source's mask of a photo (its mask_dir and mask_suffix), found (find_mask)."""
    settings = spec.tiles
    folder = Path(settings.mask_dir) if settings.mask_dir else None
    return find_mask(Path(photo), settings.mask_suffix, folder, spec.root)


def mask_levels(
    path: Path, photo: Path, size: tuple[int, int], values: Mapping[int, str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(crack, ignore) of a mask file, read, checked and fitted to its photo's size, its
    grey levels meaning what a masks source's mask_values say."""
    grey = fit_to_photo(read_mask(path, photo), path, photo, size)
    return mask_classes(grey, values or {})


def photo_tiles(spec: SourceSpec, photo: str) -> PhotoTiles:
    """A photo's tiles and their labels from its mask; DataError naming the photo, its mask
    and the setting when the photo is too small or the mask is missing or unusable."""
    settings = spec.tiles
    where = spec.where
    path = Path(photo)
    try:
        mask_file = source_mask_file(spec, path)
        width, height = oriented_size(path)
        if min(width, height) < settings.tile_size:
            raise DataError(
                f"Photo {photo} is {width}x{height}, smaller than "
                f"{where}.tile_size={settings.tile_size}: lower it, or remove the photo."
            )
        crack, ignore = mask_levels(mask_file, path, (width, height), settings.mask_values)
    except UnreadableImage as err:
        raise DataError(f"{where}: photo {photo}: {err}.") from None
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    boxes = tile_boxes(width, height, settings.tile_size, settings.stride)
    band = tuple(settings.ambiguous) if settings.ambiguous is not None else None
    labels = tile_is_crack(
        crack, boxes, settings.tile_size, settings.min_share, band, ignore if ignore.any() else None
    )
    samples = [
        (tile_sample(photo, x, y, settings.tile_size), int(label == CRACK))
        for (x, y), label in zip(boxes.tolist(), labels.tolist(), strict=True)
        if label != IGNORE
    ]
    return PhotoTiles(samples, int((labels == IGNORE).sum()))


def tile_source(source: SourceSpec | SourceFiles) -> list[tuple[str, int]]:
    """(tile sample, label) of every photo of a masks source (its listing, or listed now),
    sorted (a photo's tiles stay next to each other, so decoding in order reads each photo
    once)."""
    files = listed(source)
    samples = []
    for photo in find_photos(files):
        samples += photo_tiles(files.spec, photo).samples
    return sorted(samples)


def photo_groups(paths: list[str]) -> list[int]:
    """Group id per sample: the tiles of one photo share one."""
    ids: dict[str, int] = {}
    return [ids.setdefault(sample_file(path), len(ids)) for path in paths]


# --- what a crack map learns from each sample ----------------------------------------------


@functools.lru_cache(maxsize=1)
def _photo_mask(
    photo: str, mask: str, values: tuple[tuple[int, str], ...], mtime_ns: int
) -> np.ndarray:
    """A photo's mask as uint8 CRACK / NOT_CRACK / UNKNOWN at the photo's size: the last
    one read is kept, as consecutive tiles of one photo share it (decode.py's _photo)."""
    size = oriented_size(photo)
    crack, ignore = mask_levels(Path(mask), Path(photo), size, dict(values))
    levels = np.where(crack, CRACK, NOT_CRACK).astype(np.uint8)
    levels[ignore] = UNKNOWN
    return levels


def sample_mask(sample: str, label: int, spec: SourceSpec | None, image_size: int) -> torch.Tensor:
    """The (1, image_size, image_size) uint8 target of a sample (see the module's doc)."""
    if spec is None or spec.tiles is None:
        fill = NOT_CRACK if label == 0 else UNKNOWN
        return torch.full((1, image_size, image_size), fill, dtype=torch.uint8)
    photo, tile = split_tile(sample)
    mask = source_mask_file(spec, photo)
    levels = tuple(sorted((spec.tiles.mask_values or {}).items()))
    try:
        values = _photo_mask(photo, str(mask), levels, os.stat(mask).st_mtime_ns)
    except OSError as err:
        raise UnreadableImage(f"its mask cannot be read ({err})") from None
    x, y, size = tile
    crop = torch.from_numpy(values[y : y + size, x : x + size]).view(1, 1, size, size)
    return F.interpolate(crop, size=(image_size, image_size), mode="nearest-exact")[0]


class MaskedImages(DecodedImages):
    """Samples decoded as DecodedImages decodes them (damaged ones stop or are skipped
    alike), each with its target: {"mask": (1, S, S) uint8, "label": int}."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        specs: Sequence[SourceSpec | None],
        image_size: int,
        on_bad: OnBadImage,
    ) -> None:
        super().__init__(
            [path for path, _ in samples], list(range(len(samples))), image_size, on_bad
        )
        self.labels = [label for _, label in samples]
        self.specs = specs

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
        image, chosen = super().__getitem__(index)  # the sample read (another if skipped)
        mask = sample_mask(
            str(self.paths[chosen]), self.labels[chosen], self.specs[chosen], self.image_size
        )
        return image, {"mask": mask, "label": self.labels[chosen]}
