"""Patch-level crack precision and recall of a scan against a photo's crack mask.

A patch counts as truly cracked by the tile rule of data/masks.py (at least `min_share`
of its pixels crack in the mask), the one a masks source labels its tiles by; the mask is
found, checked and fitted to the photo there too.

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


def patch_truth(result: ScanResult, mask: np.ndarray, min_share: float) -> np.ndarray:
    """Whether each scanned patch is cracked according to the mask (the tile rule)."""
    return tile_is_crack(mask, result.boxes, result.patch_size, min_share) == CRACK


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


def format_scores(report: dict[str, dict[str, float | int | None]]) -> str:
    """The report for people: one line per photo, n/a where a figure is undefined."""
    names = [*REPORT_COLUMNS, *REPORT_FIGURES]
    widths = [max(len(name), 6) for name in names]
    first = max([len("photo"), *map(len, report)])
    lines = [" ".join([f"{'photo':<{first}}", *map(str.rjust, names, widths)])]
    for photo, scores in report.items():
        cells = [str(scores[name]) for name in REPORT_COLUMNS]
        cells += [figure(scores[name]) for name in REPORT_FIGURES]
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
# the row pooling every folder's patches, when there are several
ALL = "all"
# how a photo's mask is read: (photo, (width, height)) -> boolean crack mask
MaskReader = Callable[[Path, tuple[int, int]], np.ndarray]


@dataclass
class PooledPatches:
    """The patches of a folder's photos, pooled for micro figures."""

    photos: int = 0
    truth: list[np.ndarray] = field(default_factory=list)
    cracked: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)

    def add(self, result: ScanResult, truth: np.ndarray) -> None:
        self.photos += 1
        self.truth.append(truth)
        self.cracked.append(result.cracked)
        self.probs.append(result.probs)

    def row(self, name: str) -> dict[str, float | int | str | None]:
        """Micro precision, recall and F1 (every patch of every photo counted once) of the
        scan's cracked patches, and ROC-AUC of P(crack) over the pooled patches."""
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
        }


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
) -> tuple[dict[str, dict], list[dict]]:
    """Score each scanned photo against its mask (the tile rule); return the per-photo
    report and one summary row per group, plus ALL (every photo once) when there are
    several groups. `results` are the scans of unique_photos(groups) (scan.scan_files)."""
    owners: dict[Path, list[int]] = {}
    for index, (_, photos) in enumerate(groups):
        for photo in photos:
            owners.setdefault(Path(photo), []).append(index)
    pooled = [PooledPatches() for _ in groups]
    everything = PooledPatches()
    report: dict[str, dict] = {}
    for result in results:
        truth = patch_truth(result, mask_of(result.path, (result.width, result.height)), min_share)
        report[result.name + result.path.suffix] = patch_scores(result, truth)
        for index in owners[result.path]:
            pooled[index].add(result, truth)
        everything.add(result, truth)
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
) -> str:
    """scan_eval.json (per photo; null where undefined), scan_summary.csv and .md (per
    folder) into out, and with add_scalar TensorBoard scalars scan_eval/FOLDER/FIGURE;
    returns the Markdown table."""
    write_json(out / "scan_eval.json", report)
    write_csv(out / "scan_summary.csv", SUMMARY_COLUMNS, rows)
    table = markdown_table(rows, SUMMARY_COLUMNS)
    write_text(out / "scan_summary.md", f"threshold {threshold}\n\n{table}\n")
    if add_scalar is not None:
        for row in rows:
            for name in ("precision", "recall", "f1", "auroc"):
                if row[name] is not None:
                    add_scalar(f"scan_eval/{row['folder']}/{name}", float(row[name]), step)
    return table
