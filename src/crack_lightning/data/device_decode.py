"""JPEG decoding on the training device (data.decode_on_device=true).

On a GPU, decoding and resizing in CPU workers can starve the model: a 2-core host
decodes a few hundred 227 px JPEGs a second, the GPU trains on thousands. Here the
workers only read the files' bytes; each batch is decoded on its device in one batched
call (nvJPEG on CUDA) and resized there. On a CPU the same code decodes with
libjpeg-turbo, so it runs and is tested anywhere. Files that are not JPEG are decoded on
the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms.v2.functional import resize

JPEG_MAGIC = b"\xff\xd8"


class EncodedImages(Dataset):
    """(file bytes as a uint8 tensor, label) pairs: the workers' only job is reading."""

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with warnings.catch_warnings():  # torchvision 0.29 marks its io deprecated
            warnings.simplefilter("ignore")
            return read_file(path), label


def collate_encoded(
    items: list[tuple[torch.Tensor, int]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Byte strings differ in length: keep them a list."""
    return [data for data, _ in items], torch.tensor([label for _, label in items])


def decode_batch(
    encoded: Sequence[torch.Tensor], image_size: int, device: torch.device | str
) -> torch.Tensor:
    """uint8 (N, 3, image_size, image_size) RGB on `device` from encoded files (on CPU)."""
    is_jpeg = [bytes(data[:2].tolist()) == JPEG_MAGIC for data in encoded]
    jpegs = [data for data, jpeg in zip(encoded, is_jpeg, strict=True) if jpeg]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
        images = [
            next(decoded) if jpeg else decode_image(data, mode=ImageReadMode.RGB).to(device)
            for data, jpeg in zip(encoded, is_jpeg, strict=True)
        ]
    size = [image_size, image_size]
    return torch.stack([resize(image, size, antialias=True) for image in images])
