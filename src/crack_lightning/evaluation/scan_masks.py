"""Patch-level crack precision and recall of a scan against a photo's crack mask, and
pixel-level ones where the scan carries a crack map.

A patch counts as truly cracked by the tile rule of data/masks.py (at least `min_share`
of its pixels crack in the mask), the one a masks source labels its tiles by; the mask is
found, checked and fitted to the photo there too. A map's pixels are crack at the scan's
decision threshold and right within a distance tolerance of the mask's crack
(evaluation/crack_maps.py tolerant_scores).

The command that scans photos and scores them is commands/scan_eval.py (crack-scan-eval).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crack_lightning.data.masks import CRACK, load_mask, photos_in, tile_is_crack
from crack_lightning.errors import PredictionError
from crack_lightning.evaluation.crack_maps import PIXEL_TOLERANCE, tolerant_figures, tolerant_scores
from crack_lightning.evaluation.folders import input_names, markdown_table
from crack_lightning.evaluation.metrics import (
    binary_scores,
    counts,
    f1,
    figure,
    precision,
    recall,
    roc_auc,
)
from crack_lightning.io import write_csv, write_json, write_text

if TYPE_CHECKING:  # inference/ sits above evaluation/: the type only
    from crack_lightning.inference.scan import ScanResult

# the figures of a photo's report line, after its name (None prints as n/a)
REPORT_COLUMNS = ("patches", "cracked_patches", "found_patches", "false_alarms")
REPORT_FIGURES = ("precision", "recall", "f1", "auroc")
# a crack map's pixel figures (after the patch figures, where the scan has a map) and the
# counts they come from, which pool over photos (micro)
PIXEL_FIGURES = ("pixel_precision", "pixel_recall", "pixel_f1")
PIXEL_COUNTS = ("crack_pixels", "found_pixels", "predicted_pixels", "matched_pixels")


def patch_truth(result: ScanResult, mask: np.ndarray, min_share: float) -> np.ndarray:
    """Whether each scanned patch is cracked according to the mask (the tile rule)."""
    return tile_is_crack(mask, result.boxes, result.patch_size, min_share) == CRACK


def photo_name(result: ScanResult) -> str:
    """A scanned photo's name in the per-photo report (scan_eval.json): its output name
    (scan.output_names: distinct among the scan's photos) and its extension."""
    return result.name + result.path.suffix


def patch_scores(result: ScanResult, truth: np.ndarray) -> dict[str, float | int | None]:
    """Precision, recall and F1 of the scan's cracked patches (unfamiliar ones count as
    not cracked) with their counts, the same for P(crack) alone, and ROC-AUC of P(crack)
    (None where the mask makes every patch cracked or none)."""
    alone = binary_scores(truth, result.probs, result.threshold)
    final = counts(truth, result.cracked)
    return {
        "patches": len(truth),
        "cracked_patches": int(truth.sum()),
        "unfamiliar_patches": int(result.is_unfamiliar.sum()),
        "threshold": result.threshold,
        "found_patches": final.tp,
        "false_alarms": final.fp,
        "precision": precision(final),
        "recall": recall(final),
        "f1": f1(final),
        "classifier_precision": alone["precision"],
        "classifier_recall": alone["recall"],
        "auroc": alone["auroc"],
    }


def pixel_scores(
    result: ScanResult, mask: np.ndarray, tolerance: float = PIXEL_TOLERANCE
) -> dict[str, float | int | None] | None:
    """Pixel precision, recall and F1 (named pixel_*) of the scan's crack map at its
    decision threshold, within `tolerance` pixels of the mask's crack, with the counts;
    None when the scan has no map."""
    if result.crack_map is None:
        return None
    if result.crack_map.shape != mask.shape:
        raise PredictionError(
            f"The crack map of {result.path} is {result.crack_map.shape[1]}x"
            f"{result.crack_map.shape[0]} pixels but its mask {mask.shape[1]}x{mask.shape[0]}."
        )
    return _pixel_named(tolerant_scores(result.crack_map >= result.threshold, mask, tolerance))


def _pixel_named(scores: dict[str, float | int | None]) -> dict[str, float | int | None]:
    """tolerant_figures' keys as the report names them (pixel_f1 beside the patches' f1)."""
    return {(f"pixel_{k}" if f"pixel_{k}" in PIXEL_FIGURES else k): v for k, v in scores.items()}


def format_scores(report: dict[str, dict[str, float | int | None]]) -> str:
    """The report for people: one line per photo, n/a where a figure is undefined; the
    pixel figures where a scan has a crack map."""
    mapped = any(PIXEL_FIGURES[0] in scores for scores in report.values())
    shown = (*REPORT_FIGURES, *(PIXEL_FIGURES if mapped else ()))
    names = [*REPORT_COLUMNS, *shown]
    widths = [max(len(name), 6) for name in names]
    first = max([len("photo"), *map(len, report)])
    lines = [" ".join([f"{'photo':<{first}}", *map(str.rjust, names, widths)])]
    for photo, scores in report.items():
        cells = [str(scores[name]) for name in REPORT_COLUMNS]
        cells += [figure(scores.get(name)) for name in shown]
        lines.append(" ".join([f"{photo:<{first}}", *map(str.rjust, cells, widths)]))
    return "\n".join(lines)


# --- folders of masked photos: micro figures per folder, a summary table ---------------

# the summary's columns (scan_summary.csv / .md), one row per folder (or photo) given
SUMMARY_COLUMNS = (
    "folder",
    "photos",
    "patches",
    "cracked_patches",
    "found_patches",
    "false_alarms",
    "precision",
    "recall",
    "f1",
    "auroc",
)
# the summary's pixel columns, when a scan has a crack map: the Markdown table leaves
# the counts to the CSV
PIXEL_SUMMARY_CSV = (*PIXEL_COUNTS, *PIXEL_FIGURES)
# the row pooling every folder's patches, when there are several
ALL = "all"
# how a photo's mask is read: (photo, (width, height)) -> boolean crack mask
MaskReader = Callable[[Path, tuple[int, int]], np.ndarray]


@dataclass
class PooledPatches:
    """The patches of a folder's photos, pooled for micro figures, and the pixel counts
    of the photos scanned with a crack map."""

    photos: int = 0
    truth: list[np.ndarray] = field(default_factory=list)
    cracked: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    mapped_photos: int = 0
    pixels: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PIXEL_COUNTS, 0))

    def add(
        self,
        result: ScanResult,
        truth: np.ndarray,
        pixels: dict[str, float | int | None] | None = None,
    ) -> None:
        self.photos += 1
        self.truth.append(truth)
        self.cracked.append(result.cracked)
        self.probs.append(result.probs)
        if pixels is not None:
            self.mapped_photos += 1
            for name in PIXEL_COUNTS:
                self.pixels[name] += int(pixels[name])

    def row(self, name: str) -> dict[str, float | int | str | None]:
        """Micro precision, recall and F1 (every patch of every photo counted once) of the
        scan's cracked patches, and ROC-AUC of P(crack) over the pooled patches; the
        same micro figures of the mapped photos' pixels (None without one)."""
        truth = np.concatenate(self.truth) if self.truth else np.zeros(0, dtype=bool)
        found = counts(truth, np.concatenate(self.cracked) if self.cracked else truth)
        probs = np.concatenate(self.probs) if self.probs else np.zeros(0)
        return {
            "folder": name,
            "photos": self.photos,
            "patches": len(truth),
            "cracked_patches": int(truth.sum()),
            "found_patches": found.tp,
            "false_alarms": found.fp,
            "precision": precision(found),
            "recall": recall(found),
            "f1": f1(found),
            "auroc": roc_auc(truth, probs),
            "mapped_photos": self.mapped_photos,
            **self.pixel_row(),
        }

    def pixel_row(self) -> dict[str, float | int | None]:
        if not self.mapped_photos:
            return dict.fromkeys(PIXEL_SUMMARY_CSV)
        counts_ = self.pixels
        pooled = tolerant_figures(
            predicted=counts_["predicted_pixels"],
            matched=counts_["matched_pixels"],
            crack=counts_["crack_pixels"],
            found=counts_["found_pixels"],
        )
        return _pixel_named(pooled)


def expand_photos(items: Sequence[str | Path]) -> list[tuple[str, list[Path]]]:
    """(name, photos) per item of photos=: a folder's photos (sub-folders included, masks
    left out), or one photo; names are short and unique (the folder's or file's name)."""
    groups = []
    for name, item in zip(input_names([str(i) for i in items]), items, strict=True):
        path = Path(item)
        if path.is_dir():
            photos = [Path(p) for p in photos_in(path)]
            if not photos:
                raise PredictionError(
                    f"photos: folder {path} holds no photos (images not named *_mask.png): "
                    f"give folders of photos with PHOTO_mask.png beside each."
                )
            groups.append((name, photos))
        elif path.is_file():
            groups.append((name, [path]))
        else:
            raise PredictionError(f"photos: {path} is neither a photo nor a folder of photos.")
    return groups


def unique_photos(groups: Sequence[tuple[str, Sequence[Path]]]) -> list[Path]:
    """Every photo of the groups once, in order: what to scan (a photo in several groups
    is scanned once and counts in each)."""
    return list(dict.fromkeys(Path(photo) for _, photos in groups for photo in photos))


def score_groups(
    groups: Sequence[tuple[str, Sequence[Path]]],
    results: Iterable[ScanResult],
    min_share: float,
    mask_of: MaskReader = load_mask,
    pixel_tolerance: float = PIXEL_TOLERANCE,
) -> tuple[dict[str, dict], list[dict]]:
    """Score each scanned photo against its mask (the tile rule; its pixels too where the
    scan has a crack map, within pixel_tolerance); return the per-photo report and one
    summary row per group, plus ALL (every photo once) when there are several groups.
    `results` are the scans of unique_photos(groups) (scan.scan_files)."""
    owners: dict[Path, list[int]] = {}
    for index, (_, photos) in enumerate(groups):
        for photo in photos:
            owners.setdefault(Path(photo), []).append(index)
    pooled = [PooledPatches() for _ in groups]
    everything = PooledPatches()
    report: dict[str, dict] = {}
    for result in results:
        mask = mask_of(result.path, (result.width, result.height))
        truth = patch_truth(result, mask, min_share)
        pixels = pixel_scores(result, mask, pixel_tolerance)
        report[photo_name(result)] = patch_scores(result, truth) | (pixels or {})
        for index in owners[result.path]:
            pooled[index].add(result, truth, pixels)
        everything.add(result, truth, pixels)
    rows = [patches.row(name) for (name, _), patches in zip(groups, pooled, strict=True)]
    if len(groups) > 1:
        rows.append(everything.row(ALL))
    return report, rows


def write_scan_summary(
    out: Path,
    report: dict[str, dict],
    rows: Sequence[dict],
    threshold: float,
    add_scalar: Callable[[str, float, int], None] | None = None,
    step: int = 0,
    pixel_tolerance: float = PIXEL_TOLERANCE,
) -> str:
    """scan_eval.json (per photo; null where undefined), scan_summary.csv and .md (per
    folder; pixel columns where a scan had a crack map, scored within pixel_tolerance)
    into out, and with add_scalar TensorBoard scalars scan_eval/FOLDER/FIGURE; returns the
    Markdown summary as written (its threshold and tolerance, then the table)."""
    mapped = any(row.get("mapped_photos") for row in rows)
    write_json(out / "scan_eval.json", report)
    write_csv(
        out / "scan_summary.csv", (*SUMMARY_COLUMNS, *(PIXEL_SUMMARY_CSV if mapped else ())), rows
    )
    table = markdown_table(rows, (*SUMMARY_COLUMNS, *(PIXEL_FIGURES if mapped else ())))
    heading = f"threshold {threshold}" + (f", pixels within {pixel_tolerance} px" if mapped else "")
    summary = f"{heading}\n\n{table}"
    write_text(out / "scan_summary.md", summary + "\n")
    figures = ("precision", "recall", "f1", "auroc", *(PIXEL_FIGURES if mapped else ()))
    if add_scalar is not None:
        for row in rows:
            for name in figures:
                if row[name] is not None:
                    add_scalar(f"scan_eval/{row['folder']}/{name}", float(row[name]), step)
    return summary
