"""A masks source: photos with crack masks, cut into labelled tiles.

`+data/sources@data.sources.NAME=masks data.sources.NAME.root=DIR` (conf/data/sources/
masks.yaml): every photo under DIR with its mask (PHOTO_mask.png beside it, or under
mask_dir) becomes tiles of tile_size at stride, placed as a scan's windows (the last
flush with the edge) and labelled by the one tile rule (masks.tile_is_crack): crack when
at least min_share of the tile is crack, not crack otherwise, left out when its share
lies in the ambiguous band or, not cracked, it holds pixels mapped to ignore. A tile is
a sample string `PHOTO#x,y,size` (data/decode.py), so splitting, the manifest, decoding
and the feature cache treat tiles like files; the split keeps every photo's tiles on one
side (photo_groups).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from crack_lightning.data.decode import oriented_size, sample_file, tile_sample
from crack_lightning.data.masks import (
    CRACK,
    IGNORE,
    find_mask,
    fit_to_photo,
    mask_classes,
    read_mask,
    tile_boxes,
    tile_is_crack,
)
from crack_lightning.data.sources import IMG_EXTENSIONS, SourceSpec, image_files, source_folders
from crack_lightning.errors import DataError, UnreadableImage


@dataclass
class PhotoTiles:
    """One photo's labelled tiles, and how many were left out (IGNORE)."""

    samples: list[tuple[str, int]]
    ignored: int


def find_photos(spec: SourceSpec) -> list[str]:
    """The photos of a masks source: the images under its root (the one finder), less its
    masks (names ending in mask_suffix) and anything under mask_dir; none is an error."""
    settings = spec.tiles
    root = source_folders(spec)[0]
    if settings.mask_dir is not None and not Path(settings.mask_dir).is_dir():
        raise DataError(
            f"{spec.where}.mask_dir={settings.mask_dir} is not a folder: point it at the "
            f"masks' folder, or set it to null for masks beside their photos."
        )
    suffix = settings.mask_suffix.lower()
    masks = os.path.join(os.path.realpath(settings.mask_dir), "") if settings.mask_dir else None
    photos = [
        path
        for path in image_files(root)
        if not path.lower().endswith(suffix)
        and not (masks and os.path.realpath(path).startswith(masks))
    ]
    if not photos:
        raise DataError(
            f"{spec.where}.root={spec.root} holds no photos (looked for "
            f"{', '.join(IMG_EXTENSIONS)} files not named *{settings.mask_suffix}). Point it "
            f"at a folder of photos with PHOTO{settings.mask_suffix} beside each."
        )
    return photos


def photo_tiles(spec: SourceSpec, photo: str) -> PhotoTiles:
    """A photo's tiles and their labels from its mask; DataError naming the photo, its mask
    and the setting when the photo is too small or the mask is missing or unusable."""
    settings = spec.tiles
    where = spec.where
    path = Path(photo)
    folder = Path(settings.mask_dir) if settings.mask_dir else None
    try:
        mask_file = find_mask(path, settings.mask_suffix, folder, spec.root)
        width, height = oriented_size(path)
        if min(width, height) < settings.tile_size:
            raise DataError(
                f"Photo {photo} is {width}x{height}, smaller than "
                f"{where}.tile_size={settings.tile_size}: lower it, or remove the photo."
            )
        grey = fit_to_photo(read_mask(mask_file, path), mask_file, path, (width, height))
    except UnreadableImage as err:
        raise DataError(f"{where}: photo {photo}: {err}.") from None
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    crack, ignore = mask_classes(grey, settings.mask_values or {})
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


def tile_source(spec: SourceSpec) -> list[tuple[str, int]]:
    """(tile sample, label) of every photo of a masks source, sorted (a photo's tiles stay
    next to each other, so decoding in order reads each photo once)."""
    samples = []
    for photo in find_photos(spec):
        samples += photo_tiles(spec, photo).samples
    return sorted(samples)


def photo_groups(paths: list[str]) -> list[int]:
    """Group id per sample: the tiles of one photo share one."""
    ids: dict[str, int] = {}
    return [ids.setdefault(sample_file(path), len(ids)) for path in paths]
