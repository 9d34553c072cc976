"""JPEG decoding on the training device (data.decode_on_device=true).

On a GPU, decoding and resizing in CPU workers can starve the model: a 2-core host
decodes a few hundred 227 px JPEGs a second, the GPU trains on thousands. Here the
workers only read the files' bytes; each batch is decoded on its device in one batched
call (nvJPEG on CUDA) and resized there. On a CPU the same code decodes with
libjpeg-turbo, so it runs and is tested anywhere. JPEGs get their EXIF orientation
applied as data/decode.py does; files that are not JPEG (PNG with transparency, 16-bit
images, ...) are decoded in the workers by data/decode.py itself, so they get the same
pixels as on every other path.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms.v2.functional import resize

from crack_lightning.data.decode import decode
from crack_lightning.errors import DamagedImage

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
    return torch.stack([resize(image, size, antialias=True) for image in images])
