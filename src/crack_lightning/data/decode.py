"""The one way image files become model inputs: training, the feature cache, prediction,
scan, export calibration and the benchmark all decode and resize here, so the model sees
the same pixels for the same file everywhere; also decoding on the training device
(data.decode_on_device) and the inputs predict.py is given (files, folders, patterns).

A file is decoded fully (truncation is caught), its EXIF orientation applied, converted
to 8-bit RGB (16-bit greys rescaled, transparency shown over white) and resized to a
uint8 CHW tensor. JPEG scan data is also checked for markers that cannot occur in an
intact file, which libjpeg would only warn about while decoding garbage. A sample may also
be a tile of a photo (`PHOTO#x,y,size`, a masks source's): decoded the same way, cropped,
then resized like any image.
"""

from __future__ import annotations

import functools
import glob
import io
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms.v2.functional import resize as resize_tensor

from crack_lightning.data.sources import IMG_EXTENSIONS, image_files
from crack_lightning.data.transforms import eval_transform
from crack_lightning.errors import DamagedImage, UnreadableImage
from crack_lightning.settings import CLASS_NAMES

log = logging.getLogger(__name__)

# part of the feature cache key: bump it whenever decoding changes what pixels a file gives
DECODE_VERSION = 2
# what a damaged training image does: skipped (named in a warning) or stops the run
OnBadImage = Literal["skip", "stop"]
EXIF_ORIENTATION = 0x0112

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
    except FileNotFoundError:
        if path.is_symlink():
            raise UnreadableImage(
                f"a broken link: its target {path.readlink()} does not exist"
            ) from None
        raise UnreadableImage("does not exist") from None
    except OSError as err:  # a folder, no permission, a failing disk
        raise UnreadableImage(f"cannot be read: {err.strerror or err}") from None
    try:
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
        raise too_large(err) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImage(f"corrupt or truncated image ({err})") from None


def too_large(err: Image.DecompressionBombError) -> UnreadableImage:
    """A photo above Pillow's own pixel limit (a decompression bomb, or a huge photo)."""
    return UnreadableImage(f"too large to decode safely ({err})")


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


# --- tiles of a photo as samples ----------------------------------------------------------
# A masks source (data/masks.py) cuts photos into tiles; a tile is a sample string like a
# file's, `PHOTO#x,y,size` (top-left corner and side in the photo's pixels, after EXIF
# orientation), so the datamodule, the feature cache (keyed by sample strings) and the
# manifest treat tiles and files alike. This is the one place that reads such a string.
# No image file is named like that: the finder only reads names that end in an image
# extension.
_TILE = re.compile(r"^(?P<photo>.+)#(?P<x>\d+),(?P<y>\d+),(?P<size>\d+)$")


def tile_sample(photo: str | Path, x: int, y: int, size: int) -> str:
    """The sample string of the size x size tile at (x, y) of a photo."""
    return f"{photo}#{int(x)},{int(y)},{int(size)}"


def split_tile(sample: str | Path) -> tuple[str, tuple[int, int, int] | None]:
    """(the file a sample reads, its tile (x, y, size) or None for a whole file)."""
    match = _TILE.match(str(sample))
    if match is None:
        return str(sample), None
    return match["photo"], (int(match["x"]), int(match["y"]), int(match["size"]))


def sample_file(sample: str | Path) -> str:
    """The file a sample (a file, or a tile of a photo) reads."""
    return split_tile(sample)[0]


def oriented_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image load_rgb would give, from the file's header (its EXIF
    orientation applied), without decoding it; UnreadableImage if it cannot be opened or
    is above Pillow's pixel limit."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    except Image.DecompressionBombError as err:
        raise too_large(err) from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise UnreadableImage(f"cannot be opened as an image ({err})") from None
    return (height, width) if turned else (width, height)


@functools.lru_cache(maxsize=1)
def _photo(path: str, size: int, mtime_ns: int) -> Image.Image:
    """The last photo decoded, kept while its file is unchanged: consecutive tiles of one
    photo (in order: the feature cache's fill, validation, a batch's share of a worker)
    decode it once; a shuffled epoch decodes about once per tile. One photo per process."""
    return load_rgb(path)


def load_sample(sample: str | Path) -> Image.Image:
    """A sample's RGB pixels: a whole file (load_rgb), or a tile cropped from its photo;
    UnreadableImage if the file cannot be read or the tile is not inside it."""
    path, tile = split_tile(sample)
    if tile is None:
        return load_rgb(path)
    try:
        stat = os.stat(path)
        photo = _photo(path, stat.st_size, stat.st_mtime_ns)
    except OSError:
        photo = load_rgb(path)  # names why it cannot be read
    x, y, size = tile
    if x + size > photo.width or y + size > photo.height:
        raise UnreadableImage(
            f"tile {x},{y},{size} reaches outside the {photo.width}x{photo.height} photo "
            f"(has it changed since the split?)"
        )
    return photo.crop((x, y, x + size, y + size))


def decode(path: str | Path, image_size: int) -> torch.Tensor:
    """The model input for a sample (a file, or a tile of a photo: `PHOTO#x,y,size`):
    uint8 (3, image_size, image_size); UnreadableImage if none."""
    return resize(load_sample(path), image_size)


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
        self,
        paths: Sequence[str | Path],
        targets: Sequence[int],
        image_size: int,
        on_bad: OnBadImage,
    ) -> None:
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


# --- decoding on the training device (data.decode_on_device=true) ---------------------------
# On a GPU, decoding and resizing in CPU workers can starve the model: a 2-core host
# decodes a few hundred 227 px JPEGs a second, the GPU trains on thousands. There the
# workers only read the files' bytes; each batch is decoded on its device in one batched
# call (nvJPEG on CUDA) and resized there. On a CPU the same code decodes with
# libjpeg-turbo, so it runs and is tested anywhere. JPEGs get their EXIF orientation
# applied as load_rgb does; files that are not JPEG (PNG with transparency, 16-bit
# images, ...) are decoded in the workers by decode() itself, so they get the same
# pixels as on every other path.

JPEG_MAGIC = b"\xff\xd8"


class EncodedImages(Dataset):
    """(JPEG bytes as a 1-D uint8 tensor, label) pairs: for JPEGs the workers only read;
    any other file is decoded here by data/decode.py ((3, size, size) uint8)."""

    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int) -> None:
        self.samples = samples
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        if split_tile(path)[1] is not None:  # a tile: cropped and resized here
            return decode(path, self.image_size), label
        with warnings.catch_warnings():  # torchvision 0.29 marks its io deprecated
            warnings.simplefilter("ignore")
            data = read_file(path)
        if bytes(data[:2].tolist()) != JPEG_MAGIC:
            return decode(path, self.image_size), label
        return data, label


def collate_encoded(
    items: list[tuple[torch.Tensor, int]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Byte strings differ in length: keep them a list."""
    return [data for data, _ in items], torch.tensor([label for _, label in items])


def decode_batch(
    encoded: Sequence[torch.Tensor], image_size: int, device: torch.device | str
) -> torch.Tensor:
    """uint8 (N, 3, image_size, image_size) RGB on `device` from JPEG bytes (1-D) and
    images the workers decoded already (3-D)."""
    is_jpeg = [data.ndim == 1 for data in encoded]
    jpegs = [data for data, jpeg in zip(encoded, is_jpeg, strict=True) if jpeg]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decoded = (
                decode_jpeg(
                    jpegs, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
                )
                if jpegs
                else []
            )
        except RuntimeError as err:
            raise DamagedImage(
                f"a JPEG of this batch cannot be decoded on {device} ({err}). Find it with "
                f"`crack-data check`, or set data.decode_on_device=false to skip damaged files."
            ) from None
    decoded = iter(decoded)
    images = [
        next(decoded) if jpeg else data.to(device)
        for data, jpeg in zip(encoded, is_jpeg, strict=True)
    ]
    size = [image_size, image_size]
    return torch.stack([resize_tensor(image, size, antialias=True) for image in images])


# --- what predict.py is given ----------------------------------------------------------------

_GLOB_CHARS = set("*?[")


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursively, image extensions only) and glob patterns.

    Returns the files to classify, in a stable order without repeats, and (input, reason)
    for every argument that yielded nothing.
    """
    files: dict[Path, None] = {}
    problems: list[tuple[str, str]] = []
    for item in inputs:
        item = str(item)
        path = Path(item).expanduser()
        if _GLOB_CHARS & set(item):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found = [p for p in found if p.is_file()]
            reason = "the pattern matches no file"
        elif path.is_dir():
            found = [Path(p) for p in image_files(path)]  # the finder: no FIFO, no loop
            reason = f"the folder holds no images ({', '.join(IMG_EXTENSIONS)})"
        elif path.is_file():
            found, reason = [path], ""
        elif path.exists():
            found, reason = [], "not a regular file (a FIFO or device is never read)"
        else:
            found, reason = [], "no such file or folder"
        if not found:
            problems.append((item, reason))
        files.update(dict.fromkeys(found))
    return list(files), problems


def label_from_path(path: Path) -> int | None:
    """The class a file is filed under: the nearest parent folder named Negative or Positive."""
    names = {name.lower(): label for label, name in enumerate(CLASS_NAMES)}
    for parent in path.parents:
        if parent.name.lower() in names:
            return names[parent.name.lower()]
    return None
