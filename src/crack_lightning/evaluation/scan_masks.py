"""Patch-level crack precision and recall of a scan against a photo's crack mask.

A patch counts as truly cracked by the tile rule of data/masks.py (at least `min_share`
of its pixels crack in the mask), the one a masks source labels its tiles by; the mask is
found, checked and fitted to the photo there too.

The command that scans photos and scores them is commands/scan_eval.py (crack-scan-eval).
"""

from __future__ import annotations

import numpy as np

from crack_lightning.data.masks import CRACK, tile_is_crack
from crack_lightning.evaluation.metrics import binary_scores, counts, f1, figure, precision, recall
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
