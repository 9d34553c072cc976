"""Image transforms. Per image (DataLoader workers), files are only decoded and resized to
uint8 tensors; training augmentation runs per batch (augment_batch). The model itself
converts to float and normalises, so every checkpoint carries its own preprocessing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms import v2

from crack_lightning.errors import DataError
from crack_lightning.settings import settings_of, within

SHARE = within(0, 1)
# a crack mask's pixel of unknown class (data/masks.py)
UNKNOWN_PIXEL = 255


@dataclass
class Augmentation:
    """Training-time augmentation: the settings of conf/data/augmentation/ and what they
    turn on. Every one of them off (0, false, or 1.0 for scale_min) is the identity.

    The geometric settings are the Keras projects' augmentation. The others make a photo
    look as if taken by another camera, in other light, at another distance: the
    differences between METU, SDNET2018 and an inspector's photos.
    """

    settings_error = DataError
    horizontal_flip: bool
    vertical_flip: bool
    rotation_degrees: Annotated[float, within(0, 180)]
    scale_min: Annotated[float, within(0.05, 1)]
    brightness: Annotated[float, SHARE]
    contrast: Annotated[float, SHARE]
    saturation: Annotated[float, SHARE]
    grayscale_p: Annotated[float, SHARE]
    blur_p: Annotated[float, SHARE]
    blur_sigma: Annotated[float, within(0, 10)]
    noise_std: Annotated[float, within(0, 0.5)]
    jpeg_p: Annotated[float, SHARE]
    jpeg_quality_min: Annotated[int, within(1, 95)]

    @classmethod
    def from_config(cls, config: Mapping) -> Augmentation:
        """Build from data.augmentation, every setting checked and named when wrong."""
        return settings_of(config, cls, "data.augmentation")

    @property
    def geometric(self) -> bool:
        """Flips, rotation or crop scale: one affine resampling (_geometry)."""
        return (
            self.horizontal_flip
            or self.vertical_flip
            or self.rotation_degrees > 0
            or self.scale_min < 1
        )

    @property
    def photometric(self) -> bool:
        """Anything beyond flips and rotation: scale, colour, blur, noise or JPEG."""
        return (
            self.scale_min < 1
            or max(self.brightness, self.contrast, self.saturation) > 0
            or self.grayscale_p > 0
            or (self.blur_p > 0 and self.blur_sigma > 0)
            or self.noise_std > 0
            or self.jpeg_p > 0
        )

    @property
    def enabled(self) -> bool:
        return self.geometric or self.photometric


def eval_transform(image_size: int) -> v2.Compose:
    """PIL image -> uint8 CHW tensor of image_size x image_size."""
    return v2.Compose([v2.PILToTensor(), v2.Resize((image_size, image_size), antialias=True)])


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] images as float [0, 1]; float images pass unchanged."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def augment_batch(
    images: torch.Tensor, augmentation: Augmentation, masks: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Random flips, rotation and crop scale of an image batch as one bilinear resampling
    per batch (corners filled by reflection, as Keras' fill_mode="reflect"), then the
    photometric changes; float [0, 1] out. Crack masks (N, 1, H, W uint8: 1 crack, 0 not,
    255 unknown), when given, take the same geometry and are returned beside the images.

    It runs on the batch's device after the DataLoader: on a 2-core CPU this costs about
    a tenth of doing the same per image in worker processes, which compete with the
    forward pass for the same cores, and on a GPU it costs nothing.
    """
    images = to_unit_float(images)
    if masks is not None:
        crack, known = (masks == 1).float(), (masks != UNKNOWN_PIXEL).float()
        moved = _geometry(torch.cat([images, crack, known], dim=1), augmentation)
        images, crack, known = moved[:, :3], moved[:, 3:4] > 0.5, moved[:, 4:] > 0.5
        masks = torch.where(known, crack.to(torch.uint8), UNKNOWN_PIXEL)
    else:
        images = _geometry(images, augmentation)
    images = _colour(images, augmentation)
    images = _blur(images, augmentation.blur_p, augmentation.blur_sigma)
    images = _jpeg(images, augmentation.jpeg_p, augmentation.jpeg_quality_min)
    if augmentation.noise_std > 0:
        std = _uniform(len(images), 0, augmentation.noise_std, images.device)
        images = images + torch.randn_like(images) * std.view(-1, 1, 1, 1)
    images = images.clamp_(0, 1)
    return images if masks is None else (images, masks.to(torch.uint8))


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _chosen(n: int, p: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


def _geometry(images: torch.Tensor, augmentation: Augmentation) -> torch.Tensor:
    """Flips, rotation and a random crop of random area share, as one affine resampling."""
    if not augmentation.geometric:
        return images
    n, device = len(images), images.device

    def signs(enabled: bool) -> torch.Tensor:
        if not enabled:
            return torch.ones(n, device=device)
        return torch.randint(0, 2, (n,), device=device).float().mul_(2).sub_(1)

    limit = math.radians(augmentation.rotation_degrees)
    angle = (torch.rand(n, device=device) * 2 - 1) * limit
    cos, sin = angle.cos(), angle.sin()
    flip_x, flip_y = signs(augmentation.horizontal_flip), signs(augmentation.vertical_flip)
    # side of the crop relative to the image, and its centre anywhere the crop fits
    side = _uniform(n, augmentation.scale_min, 1.0, device).sqrt()
    shift = (torch.rand(n, 2, device=device) * 2 - 1) * (1 - side).unsqueeze(1)
    # output pixel p samples the input at side * R(angle) F p + shift, F = diag(flip_x, flip_y)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x * side, -sin * flip_y * side
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_x * side, cos * flip_y * side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


def _grey(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, kept as three channels."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True).expand_as(images)


def _colour(images: torch.Tensor, augmentation: Augmentation) -> torch.Tensor:
    """Brightness, contrast and saturation jitter, then grey with probability grayscale_p."""
    n, device = len(images), images.device

    def factors(spread: float) -> torch.Tensor:
        return _uniform(n, 1 - spread, 1 + spread, device).view(-1, 1, 1, 1)

    if augmentation.brightness > 0:
        images = images * factors(augmentation.brightness)
    if augmentation.contrast > 0:
        mean = _grey(images).mean(dim=(1, 2, 3), keepdim=True)
        images = (images - mean) * factors(augmentation.contrast) + mean
    if augmentation.saturation > 0:
        grey = _grey(images)
        images = (images - grey) * factors(augmentation.saturation) + grey
    if augmentation.grayscale_p > 0:
        chosen = _chosen(n, augmentation.grayscale_p, device).view(-1, 1, 1, 1)
        images = torch.where(chosen, _grey(images), images)
    return images


def _blur(images: torch.Tensor, p: float, max_sigma: float) -> torch.Tensor:
    """Gaussian blur of a random share p of the images, each with its own sigma: one
    separable grouped convolution for the whole batch (sigma 0 is the identity kernel)."""
    if p <= 0 or max_sigma <= 0:
        return images
    n, c, h, w = images.shape
    device = images.device
    sigma = _uniform(n, 0, max_sigma, device) * _chosen(n, p, device)
    radius = math.ceil(3 * max_sigma)
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=images.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma.clamp_min(1e-3).view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = images.reshape(1, n * c, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def _jpeg(images: torch.Tensor, p: float, quality_min: int) -> torch.Tensor:
    """JPEG re-compression of a random share p of the images, each at a quality drawn
    from [quality_min, 95]: the blocking and lost fine detail of another camera's files."""
    if p <= 0:
        return images
    chosen = torch.nonzero(torch.rand(len(images)) < p).flatten().tolist()
    if not chosen:
        return images
    images = images.clone()
    for i in chosen:
        quality = int(torch.randint(quality_min, 96, ()))
        pixels = images[i].mul(255).round().clamp(0, 255).to("cpu", torch.uint8)
        decoded = decode_jpeg(encode_jpeg(pixels, quality=quality))
        images[i] = decoded.to(images.device, images.dtype) / 255
    return images
