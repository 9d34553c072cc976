"""Synthetic concrete photos: grey mottled textures with pores, and dark branching
cracks on the Positive class. For tests and the offline demo only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from crack_lightning.io import move_into_place
from crack_lightning.settings import CLASS_NAMES

_MARKER = ".synthetic.json"


def concrete_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """An RGB uint8 concrete-like surface: low-frequency mottling, grain and dark pores."""
    base = rng.uniform(130, 200)
    coarse = rng.normal(0, 1, (max(2, size // 16),) * 2)
    mottling = np.asarray(
        Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.BICUBIC)
    )
    grey = base + 12 * mottling + rng.normal(0, 7, (size, size))
    for _ in range(rng.integers(3, 12)):  # pores, so that "dark pixels" alone mean nothing
        y, x = rng.integers(0, size, 2)
        r = rng.uniform(0.8, 2.5)
        yy, xx = np.ogrid[:size, :size]
        grey[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] -= rng.uniform(40, 80)
    tint = rng.uniform(-6, 6, 3)
    rgb = grey[..., None] + tint
    return np.clip(rgb, 0, 255).astype(np.uint8)


def draw_crack(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Darken a jagged, sometimes branching line grown both ways from an interior point."""
    size = image.width
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    width = int(rng.integers(2, max(3, size // 25) + 1))
    start = rng.uniform(size / 4, 3 * size / 4, 2)
    heading = rng.uniform(0, 2 * np.pi)
    step = size / 24
    for direction in (heading, heading + np.pi):
        point, angle, points = start, direction, [tuple(start)]
        while (point >= 0).all() and (point < size).all():
            angle += rng.normal(0, 0.3)
            point = point + step * np.array([np.cos(angle), np.sin(angle)])
            points.append(tuple(point))
            if rng.random() < 0.05:  # a short, thinner branch
                turn = angle + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
                end = point + rng.uniform(2, 6) * step * np.array([np.cos(turn), np.sin(turn)])
                draw.line([tuple(point), tuple(end)], fill=255, width=max(1, width // 2))
        draw.line(points, fill=255, width=width, joint="curve")
    mask = mask.filter(ImageFilter.GaussianBlur(0.6))
    darkness = rng.uniform(0.45, 0.75)
    pixels = np.asarray(image).astype(np.float32)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255
    return Image.fromarray((pixels * (1 - darkness * alpha)).astype(np.uint8))


def generate_dataset(root: str | Path, images_per_class: int, image_size: int, seed: int) -> Path:
    """Write Negative/ and Positive/ JPEGs under root once; later calls reuse them.

    The set is built in a temporary folder and renamed into place, so an interrupted
    run never leaves a half-written data set behind.
    """
    root = Path(root)
    settings = {"images_per_class": images_per_class, "image_size": image_size, "seed": seed}
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    rng = np.random.default_rng(seed)
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for label, name in enumerate(CLASS_NAMES):
        folder = staging / name
        folder.mkdir(parents=True)
        for i in range(images_per_class):
            image = Image.fromarray(concrete_texture(rng, image_size))
            if label == 1:
                image = draw_crack(image, rng)
            image.save(folder / f"{i:05d}.jpg", quality=92)
    (staging / _MARKER).write_text(json.dumps(settings))
    shutil.rmtree(root, ignore_errors=True)
    move_into_place(staging, root)
    return root
