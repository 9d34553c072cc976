"""Sliding-window scan of a whole inspection photo: which patches show cracks, and where."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2
from tqdm.auto import tqdm

from crack_lightning.data.decode import resize
from crack_lightning.data.layout import CLASS_NAMES
from crack_lightning.errors import PredictionError
from crack_lightning.inference.classifiers import OnnxClassifier, TorchClassifier

# the heat-map PNG is scaled down to this longest side; the CSV keeps full-size coordinates
MAX_FIGURE_SIDE = 2048


@dataclass
class ScanResult:
    path: Path
    width: int
    height: int
    patch_size: int
    boxes: np.ndarray  # (N, 2) top-left x, y of each patch
    probs: np.ndarray  # (N,) P(crack) of each patch
    threshold: float

    @property
    def cracked(self) -> np.ndarray:
        return self.probs >= self.threshold

    def cracked_area_share(self) -> float:
        """Share of the photo's pixels inside at least one patch classified as cracked."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        for x, y in self.boxes[self.cracked]:
            mask[y : y + self.patch_size, x : x + self.patch_size] = True
        return float(mask.mean())


def window_starts(length: int, patch: int, stride: int) -> list[int]:
    """Start offsets covering [0, length): every stride, plus one flush with the far edge."""
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def scan_photo(
    classifier: TorchClassifier | OnnxClassifier,
    photo: Image.Image,
    path: Path,
    patch_size: int,
    stride: int,
    batch_size: int,
    threshold: float,
) -> ScanResult:
    """Classify every patch; each is resized exactly as training images are (data.decode)."""
    width, height = photo.size
    if width < patch_size or height < patch_size:
        raise PredictionError(
            f"{path} is {width}x{height}, smaller than scan.patch_size={patch_size}: "
            f"classify it with mode=predict, or lower scan.patch_size."
        )
    if stride < 1:
        raise PredictionError(f"scan.stride={stride} must be a positive number of pixels.")
    pixels = v2.functional.pil_to_tensor(photo)
    boxes = np.array(
        [
            (x, y)
            for y in window_starts(height, patch_size, stride)
            for x in window_starts(width, patch_size, stride)
        ]
    )
    probs = []
    for start in tqdm(range(0, len(boxes), batch_size), desc=f"Scanning {path.name}", unit="batch"):
        crops = [
            pixels[:, y : y + patch_size, x : x + patch_size]
            for x, y in boxes[start : start + batch_size]
        ]
        probs.append(
            classifier.predict(torch.stack([resize(c, classifier.image_size) for c in crops]))
        )
    return ScanResult(path, width, height, patch_size, boxes, np.concatenate(probs), threshold)


def write_scan_csv(result: ScanResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "width", "height", "prob_crack", "label"])
        for (x, y), prob, cracked in zip(result.boxes, result.probs, result.cracked, strict=True):
            writer.writerow(
                [
                    x,
                    y,
                    result.patch_size,
                    result.patch_size,
                    f"{prob:.6f}",
                    CLASS_NAMES[int(cracked)],
                ]
            )


def render_scan(result: ScanResult, photo: Image.Image) -> Image.Image:
    """The photo with a red heat map of P(crack) and cracked patches outlined."""
    heat = np.zeros((result.height, result.width), dtype=np.float32)
    for (x, y), prob in zip(result.boxes, result.probs, strict=True):
        window = heat[y : y + result.patch_size, x : x + result.patch_size]
        np.maximum(window, prob, out=window)
    scale = min(1.0, MAX_FIGURE_SIDE / max(result.width, result.height))
    size = (max(1, round(result.width * scale)), max(1, round(result.height * scale)))
    base = photo.convert("RGB").resize(size)
    alpha = Image.fromarray((heat**2 * 150).astype(np.uint8)).resize(size)  # faint below ~0.5
    red = Image.new("RGB", size, (230, 20, 20))
    overlay = Image.composite(red, base, alpha)
    draw = ImageDraw.Draw(overlay)
    for x, y in result.boxes[result.cracked]:
        box = [
            x * scale,
            y * scale,
            (x + result.patch_size) * scale - 1,
            (y + result.patch_size) * scale - 1,
        ]
        draw.rectangle(box, outline=(255, 235, 0), width=max(1, round(3 * scale)))
    return overlay
