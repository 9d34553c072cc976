"""Damaged image files as users meet them: bit rot, bad copies, truncated uploads."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image


def scan_start(jpeg: bytes) -> int:
    """Byte offset where the (last) JPEG scan's entropy-coded data begins."""
    sos = jpeg.rfind(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def random_bytes_mid_scan(jpeg: bytes, seed: int = 2) -> bytes:
    """400 random bytes written over the middle of the image data (seed 2: Pillow fails
    with 'broken data stream')."""
    data = bytearray(jpeg)
    middle = (scan_start(jpeg) + len(jpeg)) // 2
    data[middle : middle + 400] = random.Random(seed).randbytes(400)
    return bytes(data)


def zeroed_scan(jpeg: bytes) -> bytes:
    """The image data zeroed, headers and end marker intact: decodes to flat grey blocks."""
    data = bytearray(jpeg)
    start = scan_start(jpeg)
    data[start:-2] = bytes(len(data) - 2 - start)
    return bytes(data)


def flipped_idat(image: Image.Image) -> bytes:
    """A PNG with 40 bytes of its compressed image data inverted."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    start = data.find(b"IDAT") + 20
    data[start : start + 40] = bytes(b ^ 0xFF for b in data[start : start + 40])
    return bytes(data)


def plant_damaged(folder: Path, source_jpeg: Path) -> dict[str, Path]:
    """Three damaged images (the makers above), made from one real JPEG, in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = source_jpeg.read_bytes()
    files = {
        "random_bytes": (folder / "random_bytes.jpg", random_bytes_mid_scan(jpeg)),
        "flipped_idat": (folder / "flipped_idat.png", flipped_idat(Image.open(source_jpeg))),
        "zeroed_scan": (folder / "zeroed_scan.jpg", zeroed_scan(jpeg)),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {key: path for key, (path, _) in files.items()}


def grey16(image: Image.Image) -> Image.Image:
    """The image as a 16-bit greyscale PNG would hold it."""
    return Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
