"""Sliding-window scan of a whole inspection photo: which patches show cracks, and where."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from crack_lightning.data.decode import load_rgb, oriented_size, resize
from crack_lightning.data.masks import tile_boxes
from crack_lightning.data.workers import run_batches
from crack_lightning.errors import PredictionError, UnreadableImage
from crack_lightning.evaluation.crack_maps import MM_PER_PX, tile_probs_from_map
from crack_lightning.inference.classifiers import LoadedModel
from crack_lightning.inference.crack_maps import MapNetwork, map_png, render_map
from crack_lightning.io import write_atomically, write_csv
from crack_lightning.progress import track
from crack_lightning.settings import CLASS_NAMES, Rule, at_least, at_most

# the heat-map PNG is scaled down to this longest side; the CSV keeps full-size coordinates
MAX_FIGURE_SIDE = 2048
# the heat map's opacity where P(crack) is 1 (the page's slider moves it on its figure)
HEAT_OPACITY = 0.6


# the window of a model that stores none (trained on crops only): METU's crops are 227 px
DEFAULT_PATCH = 227


@dataclass(frozen=True)
class ScanSettings:
    """scan.* (conf/scan/default.yaml): the sliding window of predict mode=scan,
    crack-scan-eval and the inspector's page; null patch_size / stride: the model's own
    (for_model)."""

    settings_error = PredictionError
    patch_size: Annotated[
        int | None,
        at_least(1, "pixels"),
        at_most(8192, "pixels", "a window over a whole 50 Mpx photo"),
    ]
    stride: Annotated[int | None, at_least(1, "pixels")]
    # null: never label a patch Unfamiliar
    unfamiliar_limit: Annotated[float | None, Rule("a number > 0 or null", lambda v: v > 0)]
    # millimetres per pixel of the photos, for crack lengths and widths in mm; null: pixels
    mm_per_px: Annotated[float | None, MM_PER_PX] = None

    def for_model(self, window: tuple[int, int] | None) -> ScanSettings:
        """The window to scan with: scan.patch_size (and scan.stride) when set, else the
        model's own window (the tiles of the masks sources it was trained or adapted on:
        LoadedModel.window), else DEFAULT_PATCH; the stride, when not set, the model's
        with its window, else the patch size (windows side by side)."""
        if self.patch_size is not None:
            patch, stride = self.patch_size, self.stride or self.patch_size
        elif window is not None:
            patch, stride = window[0], self.stride or window[1]
        else:
            patch, stride = DEFAULT_PATCH, self.stride or DEFAULT_PATCH
        return replace(self, patch_size=patch, stride=stride)

    def describe(self) -> str:
        return f"{self.patch_size} px windows every {self.stride} px"


@dataclass
class ScanResult:
    path: Path
    width: int
    height: int
    patch_size: int
    boxes: np.ndarray  # (N, 2) top-left x, y of each patch
    probs: np.ndarray  # (N,) P(crack) of each patch
    threshold: float
    # (N,) distance from the training features (>1: unlike 99% of them), if the model has
    # feature statistics; such patches are labelled Unfamiliar, not cracked
    unfamiliar: np.ndarray | None = None
    unfamiliar_limit: float | None = None
    # the photo's results are named by this (scan_figure; distinct among the photos of a
    # run even where file names repeat: output_names)
    name: str = ""
    # (height, width) float32 P(crack) of each pixel, from a model that maps cracks
    # (crack-scan-eval scores its pixels too); None from a patch classifier
    crack_map: np.ndarray | None = None

    @property
    def is_unfamiliar(self) -> np.ndarray:
        if self.unfamiliar is None or self.unfamiliar_limit is None:
            return np.zeros(len(self.probs), dtype=bool)
        return self.unfamiliar > self.unfamiliar_limit

    @property
    def cracked(self) -> np.ndarray:
        return (self.probs >= self.threshold) & ~self.is_unfamiliar

    def labels(self) -> list[str]:
        return [
            "Unfamiliar" if odd else CLASS_NAMES[int(crack)]
            for odd, crack in zip(self.is_unfamiliar, self.cracked, strict=True)
        ]

    def probability_map(self) -> np.ndarray:
        """(height, width) mean P(crack) of the windows covering each pixel: with a
        stride below the patch size, overlapping windows smooth the map."""
        total = np.zeros((self.height, self.width), dtype=np.float32)
        count = np.zeros((self.height, self.width), dtype=np.float32)
        for (x, y), prob in zip(self.boxes, self.probs, strict=True):
            total[y : y + self.patch_size, x : x + self.patch_size] += prob
            count[y : y + self.patch_size, x : x + self.patch_size] += 1
        return total / np.maximum(count, 1)

    def cracked_area_share(self) -> float:
        """Share of the photo's pixels inside at least one patch classified as cracked."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        for x, y in self.boxes[self.cracked]:
            mask[y : y + self.patch_size, x : x + self.patch_size] = True
        return float(mask.mean())


class Windows(Dataset):
    """The patches of a photo (uint8 CHW pixels) at `boxes` (top-left x, y), each
    resized exactly as training images are (data.decode)."""

    def __init__(
        self, pixels: torch.Tensor, boxes: np.ndarray, patch_size: int, image_size: int
    ) -> None:
        self.pixels, self.boxes = pixels, boxes
        self.patch_size, self.image_size = patch_size, image_size

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> torch.Tensor:
        x, y = self.boxes[index]
        size = self.patch_size
        return resize(self.pixels[:, y : y + size, x : x + size], self.image_size)


def scan_photo(
    classifier: LoadedModel,
    photo: Image.Image,
    path: Path,
    patch_size: int,
    stride: int,
    batch_size: int,
    threshold: float,
    unfamiliar_limit: float | None = None,
    num_workers: int | None = None,
) -> ScanResult:
    """Classify every patch; each is resized exactly as training images are (data.decode). With the
    checkpoint's feature statistics, also score how unfamiliar each patch is. The window
    settings are checked at start-up (ScanSettings). A photo of at least two
    batches of patches is scanned by `num_workers` worker processes on a CPU (None: one
    per core torch uses; data/workers.py), each cutting, resizing and classifying whole
    batches."""
    if (small := too_small(*photo.size, patch_size)) is not None:
        raise PredictionError(f"{path} is {small}.")
    width, height = photo.size
    boxes = tile_boxes(width, height, patch_size, stride)
    windows = Windows(v2.functional.pil_to_tensor(photo), boxes, patch_size, classifier.image_size)
    score = classifier.unfamiliar_scorer()
    workers = torch.get_num_threads() if num_workers is None else num_workers
    workers = workers if len(boxes) >= 2 * batch_size else 0  # not worth forking for
    in_workers = classifier.ready_for_workers(workers, score)
    # else all here, as forking only to cut and resize the windows does not pay
    batches = run_batches(windows, batch_size, workers if in_workers else 0, score, in_workers)
    probs, scores = [], []
    total = -(-len(boxes) // batch_size)
    for (batch_probs, batch_scores), _ in track(
        batches, f"Scanning {path.name}", "batch", total=total
    ):
        probs.append(batch_probs)
        if batch_scores is not None:
            scores.append(batch_scores)
    return ScanResult(
        path,
        width,
        height,
        patch_size,
        boxes,
        np.concatenate(probs),
        threshold,
        np.concatenate(scores) if scores else None,
        unfamiliar_limit,
    )


def map_photo(
    network: MapNetwork,
    photo: Image.Image,
    path: Path,
    patch_size: int,
    stride: int,
    threshold: float,
) -> ScanResult:
    """A crack-map model's scan: the photo's map in one pass (or a few pieces), and each
    window's P(crack) from the map by the tile rule at the model's min_share, so that a
    window scores >= t exactly when at least min_share of its pixels do."""
    crack_map = network.crack_map(v2.functional.pil_to_tensor(photo))
    width, height = photo.size
    boxes = tile_boxes(width, height, patch_size, stride)
    probs = tile_probs_from_map(crack_map, boxes, patch_size, network.min_share)
    return ScanResult(path, width, height, patch_size, boxes, probs, threshold, crack_map=crack_map)


def cracks_file(out: Path, name: str) -> Path:
    """Where scan_files saves a crack-map model's map of the photo named `name`."""
    return out / f"{name}_cracks.png"


def output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct name for each photo's results, its stem where that is unique: photos
    that share one (a/wall.png, b/wall.png) get their folders' names in front (a_wall,
    b_wall), and those in one folder (wall.png, wall.jpg) their extension after it;
    a counter settles anything left. Compared without case, as some file systems do."""
    paths = [Path(path).absolute() for path in paths]
    same_folder = Counter((p.parent, p.stem.casefold()) for p in paths)
    bases = [
        f"{p.stem}_{p.suffix.lstrip('.')}"
        if same_folder[(p.parent, p.stem.casefold())] > 1
        else p.stem
        for p in paths
    ]
    folders = [p.parent.parts[1:] for p in paths]  # without the root
    depth = [0] * len(paths)
    while True:
        names = [
            "_".join([*parts[len(parts) - d :], base]) if d else base
            for parts, base, d in zip(folders, bases, depth, strict=True)
        ]
        counts = Counter(name.casefold() for name in names)
        clashing = [
            i
            for i, name in enumerate(names)
            if counts[name.casefold()] > 1 and depth[i] < len(folders[i])
        ]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    seen: Counter[str] = Counter()
    unique = []
    for name in names:
        seen[name.casefold()] += 1
        unique.append(name if seen[name.casefold()] == 1 else f"{name}_{seen[name.casefold()]}")
    return unique


def scan_figure(out: Path, name: str) -> Path:
    """Where scan_files saves the heat map of the photo whose output name is `name`."""
    return out / f"{name}_scan.png"


def too_small(width: int, height: int, patch_size: int) -> str | None:
    """Why a photo of this size cannot be scanned with this window, or None when it can."""
    if width >= patch_size and height >= patch_size:
        return None
    return (
        f"{width}x{height}, smaller than scan.patch_size={patch_size}: classify it with "
        f"mode=predict, or lower scan.patch_size"
    )


def scan_problem(path: Path, patch_size: int, max_pixels: int | None = None) -> str | None:
    """Why a photo cannot be scanned, from its file's header alone (before it is decoded):
    not an image, above Pillow's pixel limit or `max_pixels` (the page's), or smaller than
    one patch; None when it can be."""
    try:
        width, height = oriented_size(path)
    except UnreadableImage as err:
        return str(err)
    if max_pixels is not None and width * height > max_pixels:
        return (
            f"{width}x{height} pixels ({width * height / 1e6:.0f} Mpx) is more than "
            f"max_pixels={max_pixels}; shrink the photo or start crack-app with a higher "
            f"max_pixels"
        )
    return too_small(width, height, patch_size)


def scan_files(
    classifier: LoadedModel,
    files: Iterable[Path],
    window: ScanSettings,
    batch_size: int,
    threshold: float,
    out: Path,
    skipped: list[tuple[Path, str]],
    num_workers: int | None = None,
    max_pixels: int | None = None,
    names: Sequence[str] | None = None,
) -> Iterator[ScanResult]:
    """The one scan loop (predict mode=scan, crack-scan-eval, the inspector's page): load
    each photo, scan it, save its heat map as scan_figure(out, result.name) and yield its
    result. Results are named `names` (default output_names: photos sharing a file name
    keep their own results). A photo that cannot be scanned (scan_problem, or damaged
    past its header) is appended to `skipped` with the reason, and the scan goes on."""
    files = list(files)
    names = output_names(files) if names is None else list(names)
    out.mkdir(parents=True, exist_ok=True)
    for path, name in zip(files, names, strict=True):
        if (problem := scan_problem(path, window.patch_size, max_pixels)) is not None:
            skipped.append((path, problem))
            continue
        try:
            photo = load_rgb(path)
        except UnreadableImage as err:
            skipped.append((path, str(err)))
            continue
        if classifier.maps:
            result = map_photo(
                classifier.network, photo, path, window.patch_size, window.stride, threshold
            )
            save_png(map_png(result.crack_map), cracks_file(out, name))
        else:
            result = scan_photo(
                classifier,
                photo,
                path,
                window.patch_size,
                window.stride,
                batch_size,
                threshold,
                window.unfamiliar_limit,
                num_workers,
            )
        result.name = name
        save_png(render_figure(result, photo), scan_figure(out, name))
        yield result


def save_png(image: Image.Image, path: Path) -> None:
    """A PNG file, written atomically (io.py)."""
    write_atomically(path, lambda handle: image.save(handle, format="PNG"))


def write_scan_csv(result: ScanResult, path: Path) -> None:
    """The patches of one scan as CSV: box, P(crack), unfamiliar score and label."""
    scores = result.unfamiliar if result.unfamiliar is not None else [None] * len(result.probs)
    size = result.patch_size
    rows = [
        [x, y, size, size, f"{prob:.6f}", "" if score is None else f"{score:.3f}", label]
        for (x, y), prob, score, label in zip(
            result.boxes, result.probs, scores, result.labels(), strict=True
        )
    ]
    header = ["x", "y", "width", "height", "prob_crack", "unfamiliar", "label"]
    write_csv(path, header, rows)


def _share_map(result: ScanResult, flags: np.ndarray) -> np.ndarray:
    """(height, width) share of the windows covering each pixel that are flagged."""
    return ScanResult(
        result.path,
        result.width,
        result.height,
        result.patch_size,
        result.boxes,
        flags.astype(np.float32),
        0.5,
    ).probability_map()


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of mask within `width` pixels of its border."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def figure_scale(result: ScanResult) -> float:
    """A scan figure's scale: the photo's own size up to MAX_FIGURE_SIDE."""
    return min(1.0, MAX_FIGURE_SIDE / max(result.width, result.height))


def render_figure(
    result: ScanResult, photo: Image.Image, opacity: float = HEAT_OPACITY
) -> Image.Image:
    """A scan's figure: a crack map's crack line (render_map), else the windows' heat map
    at `opacity` (render_scan)."""
    if result.crack_map is not None:
        return render_map(result.crack_map, result.threshold, photo, figure_scale(result))
    return render_scan(result, photo, opacity)


def render_scan(
    result: ScanResult, photo: Image.Image, opacity: float = HEAT_OPACITY
) -> Image.Image:
    """The photo with a red heat map of mean P(crack) (at `opacity` where P(crack) is 1);
    where most covering windows are cracked, a yellow outline; where most are unfamiliar,
    a blue tint and outline."""
    scale = figure_scale(result)
    size = (max(1, round(result.width * scale)), max(1, round(result.height * scale)))
    heat = np.asarray(Image.fromarray(result.probability_map()).resize(size))
    cracked = np.asarray(Image.fromarray(_share_map(result, result.cracked)).resize(size)) >= 0.5
    odd = np.asarray(Image.fromarray(_share_map(result, result.is_unfamiliar)).resize(size)) >= 0.5
    pixels = np.asarray(photo.convert("RGB").resize(size)).astype(np.float32)
    alpha = (heat**2 * opacity)[..., None]  # faint below ~0.5
    pixels = pixels * (1 - alpha) + np.array([230, 20, 20]) * alpha
    pixels[odd] = pixels[odd] * 0.5 + np.array([40, 120, 255]) * 0.5
    line = max(1, round(3 * scale))
    pixels[_outline(cracked, line)] = (255, 235, 0)
    pixels[_outline(odd, line)] = (40, 120, 255)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
