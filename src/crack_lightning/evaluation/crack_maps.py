"""Figures of a crack map (a photo's per-pixel P(crack), or that map thresholded): a
tile's P(crack) that agrees with the tile rule, the cracks' count, length and width (and a
scan's cracks listed per photo), and pixel precision and recall with a distance tolerance
against a crack mask.

numpy alone at import: scipy.ndimage and scikit-image are imported by the functions that
use them, so a command that never sees a map does not pay for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crack_lightning.errors import ConfigError
from crack_lightning.io import write_csv
from crack_lightning.settings import above, require

if TYPE_CHECKING:
    from crack_lightning.inference.scan import ScanResult

# scan.mm_per_px: the size of a photo's pixel on the surface
MM_PER_PX = above(0, "a pixel's size in mm")
# a thresholded map's components below this many pixels are noise, not cracks: a 1-pixel
# line 20 px long (or a 5 x 4 speck) is the least a map can draw a crack with; texture,
# pores and edges of the surface light up in specks of a few pixels
MIN_CRACK_PIXELS = 20
# pixel precision and recall: a pixel within this distance (pixels, Euclidean) of the
# other side's crack counts as found, the usual crack-segmentation tolerance
PIXEL_TOLERANCE = 2.0
# how far apart two 8-neighbours' centres are: side by side or corner to corner
STEP, DIAGONAL = 1.0, math.sqrt(2)


# --- tiles from a map -----------------------------------------------------------------


def pixels_needed(pixels: int, min_share: float) -> int:
    """The fewest crack pixels that make a tile of `pixels` pixels crack by the tile rule
    (data/masks.py tile_is_crack: crack share >= min_share, the share a float division as
    there): ceil(min_share * pixels), corrected where that product rounds across an
    integer, and at least 1."""
    needed = max(1, math.ceil(min_share * pixels))
    while needed > 1 and (needed - 1) / pixels >= min_share:
        needed -= 1
    while needed < pixels and needed / pixels < min_share:
        needed += 1
    return needed


def tile_probs_from_map(
    prob: np.ndarray, boxes: np.ndarray, tile_size: int, min_share: float
) -> np.ndarray:
    """(N,) P(crack) of the tile_size tiles at (x, y) in boxes: the k-th largest pixel
    P(crack) of the tile, k = pixels_needed. So for every threshold T, a tile's P(crack)
    >= T exactly when the map thresholded at T makes the tile crack by the tile rule at
    min_share: tiles and pixels agree at any decision threshold. A tile reaching past an
    edge is the part inside the map, as crack_shares takes it.
    A row of tiles at a time: its full tiles are partitioned together."""
    prob = np.asarray(prob)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 2)
    width = prob.shape[1]
    result = np.empty(len(boxes), dtype=np.float64)
    for y in np.unique(boxes[:, 1]):
        band = prob[y : y + tile_size]
        row = np.flatnonzero(boxes[:, 1] == y)
        xs = boxes[row, 0]
        full = xs + tile_size <= width
        if full.any() and band.size:
            windows = np.lib.stride_tricks.sliding_window_view(band, tile_size, axis=1)
            pixels = windows[:, xs[full], :].transpose(1, 0, 2).reshape(int(full.sum()), -1)
            rank = pixels.shape[1] - pixels_needed(pixels.shape[1], min_share)
            result[row[full]] = np.partition(pixels, rank, axis=1)[:, rank]
        for index, x in zip(row[~full], xs[~full], strict=True):
            values = band[:, x : x + tile_size].ravel()
            rank = values.size - pixels_needed(values.size, min_share)
            result[index] = np.partition(values, rank)[rank]
    return result


# --- the cracks of a binary map: count, length, width --------------------------------


@dataclass(frozen=True)
class Crack:
    """One crack (a connected component of the map): its skeleton's length and its width
    at the skeleton, in pixels, and in mm where the pixel size is known."""

    pixels: int  # of the component
    length: float
    mean_width: float
    max_width: float
    box: tuple[int, int, int, int]  # x, y, width, height of its bounding box
    length_mm: float | None = None
    mean_width_mm: float | None = None
    max_width_mm: float | None = None


@dataclass(frozen=True)
class CrackMeasures:
    """The cracks of a map and their totals: summed length, width averaged over every
    skeleton pixel and its maximum (None without a crack); mm figures where mm_per_px
    was given."""

    count: int
    length: float
    mean_width: float | None
    max_width: float | None
    mm_per_px: float | None = None
    length_mm: float | None = None
    mean_width_mm: float | None = None
    max_width_mm: float | None = None
    cracks: list[Crack] = field(default_factory=list)


def _in_mm(value: float | None, mm_per_px: float | None) -> float | None:
    return None if value is None or mm_per_px is None else value * mm_per_px


def skeleton_steps(skeleton: np.ndarray) -> tuple[np.ndarray, ...]:
    """The steps between neighbouring skeleton pixels, each pair once, as (rows, cols,
    lengths) of the step's first pixel: STEP to a side neighbour, DIAGONAL to a corner
    neighbour that no side neighbour of both already joins (else a corner of the line
    would count both ways round it). Summed, the centre-to-centre length of the line
    (the 8-connected chain-code length)."""
    s = skeleton
    pairs = [
        (s[:, :-1] & s[:, 1:], (0, 0), STEP),  # right
        (s[:-1, :] & s[1:, :], (0, 0), STEP),  # down
        (s[:-1, :-1] & s[1:, 1:] & ~s[:-1, 1:] & ~s[1:, :-1], (0, 0), DIAGONAL),  # down-right
        (s[:-1, 1:] & s[1:, :-1] & ~s[:-1, :-1] & ~s[1:, 1:], (0, 1), DIAGONAL),  # down-left
    ]
    rows, cols, lengths = [], [], []
    for found, (dy, dx), length in pairs:
        r, c = np.nonzero(found)
        rows.append(r + dy)
        cols.append(c + dx)
        lengths.append(np.full(len(r), length))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(lengths)


def crack_measures(
    crack: np.ndarray, mm_per_px: float | None = None, min_pixels: int = MIN_CRACK_PIXELS
) -> CrackMeasures:
    """Count, length and width of the cracks of a binary map (True = crack).

    A crack is a connected component (8-connectivity) of at least min_pixels pixels;
    smaller ones are dropped as noise. Its length is that of its skeleton
    (skimage.morphology.skeletonize, Lee's method: a straight band's centre line from end
    to end) summed over skeleton_steps. Its width at a skeleton pixel is 2 d - 1, d the
    Euclidean distance from that pixel's centre to the nearest pixel outside the crack
    (scipy.ndimage.distance_transform_edt): the centre pixel and d - 1 on each side, so a
    band n pixels wide measures n for odd n (n - 1 for even n, whose centre line lies off
    centre). mm_per_px <= 0 is refused naming scan.mm_per_px."""
    from scipy import ndimage
    from skimage.morphology import skeletonize

    if mm_per_px is not None:
        require(MM_PER_PX, mm_per_px, "scan.mm_per_px", ConfigError)
    crack = np.asarray(crack, dtype=bool)
    labels, found = ndimage.label(crack, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=found + 1)
    kept = np.flatnonzero(sizes >= min_pixels)
    kept = kept[kept > 0]
    if not len(kept):
        return CrackMeasures(0, 0.0, None, None, mm_per_px, _in_mm(0.0, mm_per_px))
    boxes = ndimage.find_objects(labels)
    # the kept cracks' box and a pixel around it: the background nearest a crack pixel
    # borders its own crack, so the distances there are the whole map's
    top, left = (max(0, min(boxes[k - 1][axis].start for k in kept) - 1) for axis in (0, 1))
    bottom, right = (max(boxes[k - 1][axis].stop for k in kept) + 1 for axis in (0, 1))
    labels = labels[top:bottom, left:right]
    cracks = np.isin(labels, kept)
    skeleton = skeletonize(cracks, method="lee").astype(bool)
    width = 2 * ndimage.distance_transform_edt(cracks) - 1
    rows, cols, steps = skeleton_steps(skeleton)
    lengths = np.bincount(labels[rows, cols], weights=steps, minlength=found + 1)
    on_skeleton = labels[skeleton]
    widths = width[skeleton]
    width_sums = np.bincount(on_skeleton, weights=widths, minlength=found + 1)
    skeleton_pixels = np.bincount(on_skeleton, minlength=found + 1)
    max_widths = np.zeros(found + 1)
    np.maximum.at(max_widths, on_skeleton, widths)
    each = []
    for label in kept:
        rows_box, cols_box = boxes[label - 1]
        mean = float(width_sums[label] / skeleton_pixels[label])
        biggest = float(max_widths[label])
        each.append(
            Crack(
                pixels=int(sizes[label]),
                length=float(lengths[label]),
                mean_width=mean,
                max_width=biggest,
                box=(
                    cols_box.start,
                    rows_box.start,
                    cols_box.stop - cols_box.start,
                    rows_box.stop - rows_box.start,
                ),
                length_mm=_in_mm(float(lengths[label]), mm_per_px),
                mean_width_mm=_in_mm(mean, mm_per_px),
                max_width_mm=_in_mm(biggest, mm_per_px),
            )
        )
    total = float(lengths[kept].sum())
    mean_width = float(widths.mean())
    max_width = float(widths.max())
    return CrackMeasures(
        count=len(each),
        length=total,
        mean_width=mean_width,
        max_width=max_width,
        mm_per_px=mm_per_px,
        length_mm=_in_mm(total, mm_per_px),
        mean_width_mm=_in_mm(mean_width, mm_per_px),
        max_width_mm=_in_mm(max_width, mm_per_px),
        cracks=each,
    )


# --- pixel precision and recall with a tolerance ----------------------------------------


def tolerant_figures(
    predicted: int, matched: int, crack: int, found: int
) -> dict[str, float | int | None]:
    """Precision (matched of the predicted crack pixels), recall (found of the true crack
    pixels) and their F1, with the four counts, so photos pool by adding counts (micro).
    Precision is None without a predicted pixel, recall None without a true one, F1 None
    with neither (with one side empty it is 0: all missed, or all false alarms)."""
    precision = matched / predicted if predicted else None
    recall = found / crack if crack else None
    if precision is None and recall is None:
        score = None
    elif not precision or not recall:
        score = 0.0
    else:
        score = 2 * precision * recall / (precision + recall)
    return {
        "precision": precision,
        "recall": recall,
        "f1": score,
        "predicted_pixels": predicted,
        "matched_pixels": matched,
        "crack_pixels": crack,
        "found_pixels": found,
    }


def _near(pixels: np.ndarray, other: np.ndarray, tolerance: float) -> int:
    """How many of `pixels` lie within `tolerance` (Euclidean) of a pixel of `other`."""
    from scipy import ndimage

    if not pixels.any() or not other.any():
        return 0
    return int((pixels & (ndimage.distance_transform_edt(~other) <= tolerance)).sum())


def tolerant_scores(
    pred: np.ndarray, truth: np.ndarray, tolerance: float = PIXEL_TOLERANCE
) -> dict[str, float | int | None]:
    """Pixel precision, recall and F1 of a predicted crack map against the true one, a
    pixel counting as right when within `tolerance` pixels of the other's crack: a line
    drawn a pixel or two beside the annotator's is found (tolerant_figures)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"crack maps of different shapes: {pred.shape} and {truth.shape}")
    return tolerant_figures(
        predicted=int(pred.sum()),
        matched=_near(pred, truth, tolerance),
        crack=int(truth.sum()),
        found=_near(truth, pred, tolerance),
    )


# --- a scan's cracks, for its files and its line -----------------------------------------


def measure_cracks(result: ScanResult, report_dir: Path, mm_per_px: float | None) -> dict[str, Any]:
    """The cracks of a scan's crack map at its decision threshold: their count, total
    length and widths (in mm too with scan.mm_per_px), and one row per crack in
    PHOTO_cracks.csv (crack_table). A window classifier's scan has no map: {} and no file.
    The one measuring of a scan's cracks, for predict mode=scan and the page's report."""
    if result.crack_map is None:
        return {}
    measures = crack_measures(result.crack_map >= result.threshold, mm_per_px)
    header = ["crack", "x", "y", "width", "height", "length_px", "mean_width_px"]
    header += ["max_width_px", "length_mm", "mean_width_mm", "max_width_mm"]
    rows = [
        [i + 1, *crack.box, f"{crack.length:.1f}", f"{crack.mean_width:.2f}"]
        + [f"{crack.max_width:.2f}"]
        + ["" if v is None else f"{v:.2f}" for v in (crack.length_mm, crack.mean_width_mm)]
        + ["" if crack.max_width_mm is None else f"{crack.max_width_mm:.2f}"]
        for i, crack in enumerate(measures.cracks)
    ]
    write_csv(crack_table(report_dir, result.name), header, rows)
    return {
        "cracks": measures.count,
        "crack_length_px": measures.length,
        "mean_width_px": measures.mean_width,
        "max_width_px": measures.max_width,
        "crack_length_mm": measures.length_mm,
        "max_width_mm": measures.max_width_mm,
    }


def crack_table(report_dir: Path, name: str) -> Path:
    """Where measure_cracks lists the cracks of the photo whose output name is `name`."""
    return report_dir / f"{name}_cracks.csv"


def describe_cracks(measures: dict[str, Any]) -> str:
    """ "2 cracks, 350 px long (35.0 mm), widest 5.0 px (0.50 mm)" for a scan's line."""
    if not measures["cracks"]:
        return "no crack"
    mm = measures["crack_length_mm"] is not None
    length = f"{measures['crack_length_px']:.0f} px" + (
        f" ({measures['crack_length_mm']:.1f} mm)" if mm else ""
    )
    widest = f"{measures['max_width_px']:.1f} px" + (
        f" ({measures['max_width_mm']:.2f} mm)" if mm else ""
    )
    count = measures["cracks"]
    return f"{count} crack{'s' if count > 1 else ''}, {length} long, widest {widest}"
