"""Image transforms. They work on uint8 tensors and return uint8: the model itself
converts to float and normalises, so every checkpoint carries its own preprocessing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

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


def train_transform(image_size: int, augmentation: Augmentation) -> v2.Compose:
    """eval_transform followed by random flips and a reflect-filled rotation."""
    steps: list = [eval_transform(image_size)]
    if augmentation.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if augmentation.vertical_flip:
        steps.append(v2.RandomVerticalFlip())
    if augmentation.rotation_degrees > 0:
        # pad by reflection so no black corners appear (as Keras' fill_mode="reflect")
        pad = math.ceil(image_size * (math.sqrt(2) - 1) / 2)
        steps += [
            v2.Pad(pad, padding_mode="reflect"),
            v2.RandomRotation(augmentation.rotation_degrees, v2.InterpolationMode.BILINEAR),
            v2.CenterCrop(image_size),
        ]
    return v2.Compose(steps)
