"""What a crack map learns from each sample (data.targets=masks): a tile of a masks
source brings its crop of the photo's mask; a crop of a folder source brings what its label
says: not crack, an empty mask; crack, only that a crack is somewhere in it (every pixel
UNKNOWN, label 1: the loss asks its strongest pixel to be crack, models/segmenter.py).

Masks are read, checked and fitted to their photos by data/masks.py, the one reader, and
cut and resized (nearest) exactly as the image's tile is (data/decode.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crack_lightning.data.decode import DecodedImages, OnBadImage, oriented_size, split_tile
from crack_lightning.data.masks import CRACK, NOT_CRACK, mask_levels, source_mask_file
from crack_lightning.data.sources import SourceSpec
from crack_lightning.data.transforms import UNKNOWN_PIXEL as UNKNOWN
from crack_lightning.errors import UnreadableImage


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
