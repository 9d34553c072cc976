"""Patch-level crack precision and recall of a scan against a photo's crack mask.

A patch counts as truly cracked when at least `min_share` of its pixels are crack in the
mask (masks may be smaller than the photo, e.g. 256x256 for a 768x768 photo: they are
scaled up with nearest-neighbour sampling).

The command that scans photos and scores them is commands/scan_eval.py (crack-scan-eval).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from crack_lightning.errors import PredictionError
from crack_lightning.evaluation.metrics import binary_scores, counts, f1, precision, recall
from crack_lightning.inference.scan import ScanResult


def load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Boolean (height, width) crack mask at the photo's size."""
    if not path.is_file():
        raise PredictionError(f"No crack mask {path} for the photo beside it.")
    with Image.open(path) as mask:
        grey = mask.convert("L").resize(size, Image.Resampling.NEAREST)
    return np.asarray(grey) > 127


def patch_truth(result: ScanResult, mask: np.ndarray, min_share: float) -> np.ndarray:
    """Whether each scanned patch is cracked according to the mask."""
    size = result.patch_size
    shares = [mask[y : y + size, x : x + size].mean() for x, y in result.boxes]
    return np.array(shares) >= min_share


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
