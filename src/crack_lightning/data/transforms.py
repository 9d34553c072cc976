"""Image transforms. Per image (DataLoader workers), files are only decoded and resized to
uint8 tensors; training augmentation runs per batch (augment_batch). The model itself
converts to float and normalises, so every checkpoint carries its own preprocessing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from crack_lightning.errors import DataError


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation, one field per setting of conf/data/augmentation/."""

    horizontal_flip: bool
    vertical_flip: bool
    rotation_degrees: float

    @classmethod
    def from_config(cls, config: Mapping | None) -> Augmentation:
        """Build from a config mapping; None means no augmentation."""
        if config is None:
            return cls(horizontal_flip=False, vertical_flip=False, rotation_degrees=0.0)
        names = {f.name for f in fields(cls)}
        if set(config) != names:
            raise DataError(
                f"data.augmentation must set exactly {sorted(names)}; got {sorted(config)}. "
                f"Pick a file from conf/data/augmentation/ (e.g. data/augmentation=none)."
            )
        if not 0 <= float(config["rotation_degrees"]) <= 180:
            raise DataError(
                f"data.augmentation.rotation_degrees={config['rotation_degrees']} must lie "
                f"in [0, 180]."
            )
        return cls(**config)

    @property
    def enabled(self) -> bool:
        return self.horizontal_flip or self.vertical_flip or self.rotation_degrees > 0


def eval_transform(image_size: int) -> v2.Compose:
    """PIL image -> uint8 CHW tensor of image_size x image_size."""
    return v2.Compose([v2.PILToTensor(), v2.Resize((image_size, image_size), antialias=True)])


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] images as float [0, 1]; float images pass unchanged."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def augment_batch(images: torch.Tensor, augmentation: Augmentation) -> torch.Tensor:
    """Random flips and rotation of an image batch as one bilinear resampling per batch,
    corners filled by reflection (as Keras' fill_mode="reflect"); float [0, 1] out.

    It runs on the batch's device after the DataLoader: on a 2-core CPU this costs about
    a tenth of doing the same per image in worker processes, which compete with the
    forward pass for the same cores, and on a GPU it costs nothing.
    """
    n, device = len(images), images.device
    images = to_unit_float(images)

    def signs(enabled: bool) -> torch.Tensor:
        if not enabled:
            return torch.ones(n, device=device)
        return torch.randint(0, 2, (n,), device=device).float().mul_(2).sub_(1)

    limit = math.radians(augmentation.rotation_degrees)
    angle = (torch.rand(n, device=device) * 2 - 1) * limit
    cos, sin = angle.cos(), angle.sin()
    flip_x, flip_y = signs(augmentation.horizontal_flip), signs(augmentation.vertical_flip)
    # output pixel p samples the input at R(angle) F p, F = diag(flip_x, flip_y)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_y
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_x, cos * flip_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
