"""Reading any image a user may have, and turning input arguments into image files."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from crack_lightning.data.layout import CLASS_NAMES
from crack_lightning.errors import UnreadableImage

_GLOB_CHARS = set("*?[")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully, apply EXIF orientation, convert to 8-bit RGB, or raise UnreadableImage."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage("empty file (0 bytes)")
        with Image.open(path) as image:
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


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


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
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p))
            reason = f"the folder holds no images ({', '.join(IMG_EXTENSIONS)})"
        elif path.is_file():
            found, reason = [path], ""
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
