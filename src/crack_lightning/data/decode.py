"""The one way image files become model inputs: training, the feature cache, prediction,
scan, export calibration and the benchmark all decode and resize here, so the model sees
the same pixels for the same file everywhere.

A file is decoded fully (truncation is caught), its EXIF orientation applied, converted
to 8-bit RGB (16-bit greys rescaled, transparency shown over white) and resized to a
uint8 CHW tensor. JPEG scan data is also checked for markers that cannot occur in an
intact file, which libjpeg would only warn about while decoding garbage.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from crack_lightning.data.transforms import eval_transform
from crack_lightning.errors import DamagedImage, UnreadableImage

log = logging.getLogger(__name__)

# part of the feature cache key: bump it whenever decoding changes what pixels a file gives
DECODE_VERSION = 2
ON_BAD_IMAGE = ("skip", "stop")

_JPEG_SCAN_MARKERS = {0x00, 0xFF, 0xD9} | set(range(0xD0, 0xD8))  # stuffing, fill, EOI, RSTn
# markers that may sit between the scans of a progressive or multi-scan JPEG
_JPEG_BETWEEN_SCANS = {0xC4, 0xDB, 0xDD, 0xDA, 0xDC, 0xFE} | set(range(0xE0, 0xF0))


def jpeg_problem(data: bytes) -> str | None:
    """Why a JPEG's entropy-coded data is corrupt (a marker no encoder writes there, or
    restart markers out of order); None if it looks intact. Reads bytes only."""
    position = 2
    while True:  # the header's segments, up to the first scan
        if position + 4 > len(data) or data[position] != 0xFF:
            return f"corrupt JPEG header (no marker at byte {position})"
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            break
    expected_rst = 0
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return "truncated JPEG (no end-of-image marker)"
        marker = data[position + 1]
        if marker == 0xD9:
            return None
        if 0xD0 <= marker <= 0xD7:
            if marker - 0xD0 != expected_rst:
                return f"corrupt JPEG data (restart marker out of order at byte {position})"
            expected_rst = (expected_rst + 1) % 8
        elif marker in _JPEG_BETWEEN_SCANS:
            expected_rst = 0
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
            continue
        elif marker not in _JPEG_SCAN_MARKERS:
            return f"corrupt JPEG data (marker 0xFF{marker:02X} inside the scan at byte {position})"
        position += 1 if marker == 0xFF else 2


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully, apply EXIF orientation, convert to 8-bit RGB, or raise UnreadableImage."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if not data:
            raise UnreadableImage("empty file (0 bytes)")
        if data.startswith(b"\xff\xd8") and (problem := jpeg_problem(data)):
            raise UnreadableImage(f"corrupt or truncated image ({problem})")
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now, so truncation is caught here
            return to_rgb(ImageOps.exif_transpose(image))
    except UnidentifiedImageError:
        raise UnreadableImage("not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as err:
        raise UnreadableImage(f"too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImage(f"corrupt or truncated image ({err})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: 16-bit and float greys are rescaled, not clipped;
    transparent pixels are shown over white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "F" and values.max() <= 1.0:
            top = 1.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode(path: str | Path, image_size: int) -> torch.Tensor:
    """The model input for a file: uint8 (3, image_size, image_size); UnreadableImage if none."""
    return resize(load_rgb(path), image_size)


def resize(image: Image.Image | torch.Tensor, image_size: int) -> torch.Tensor:
    """A decoded RGB image (or a uint8 CHW crop of one, as scan cuts) as a model input."""
    return eval_transform(image_size)(image)


class DecodedImages(Dataset):
    """paths[i] decoded and resized, with targets[i] (a label or an index).

    An unreadable file either stops the run with its path (`stop`) or is skipped
    (`skip`): the next readable file stands in, so batches keep their size, and the
    file is flagged in `bad`, shared with the DataLoader's worker processes, so the
    main process can list what was skipped.
    """

    def __init__(
        self, paths: Sequence[str | Path], targets: Sequence[int], image_size: int, on_bad: str
    ) -> None:
        if on_bad not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad must be one of {ON_BAD_IMAGE}, not {on_bad!r}")
        self.paths, self.targets = paths, targets
        self.image_size, self.on_bad = image_size, on_bad
        self.bad = torch.zeros(len(paths), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> tuple[torch.Tensor | None, str]:
        """(image, "") or (None, why it cannot be read)."""
        try:
            return decode(self.paths[index], self.image_size), ""
        except UnreadableImage as err:
            return None, str(err)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if self.bad[candidate]:
                continue
            image, reason = self.read(candidate)
            if image is not None:
                return image, self.targets[candidate]
            self.bad[candidate] = True
            path = self.paths[candidate]
            if self.on_bad == "stop":
                raise DamagedImage(
                    f"{path}: {reason}. Delete or replace the file, or set "
                    f"data.on_bad_image=skip to train without it."
                )
            log.warning("Skipping damaged image %s: %s", path, reason)
        raise DamagedImage(f"none of the {len(self)} images can be read (e.g. {self.paths[0]}).")

    def skipped(self) -> list[str]:
        """The files found unreadable so far (in any worker process)."""
        return [str(self.paths[i]) for i in torch.nonzero(self.bad).flatten().tolist()]
