"""Patch-level crack precision and recall of a scan against a photo's crack mask.

A patch counts as truly cracked when at least `min_share` of its pixels are crack in the
mask (masks may be smaller than the photo, e.g. 256x256 for a 768x768 photo: they are
scaled up with nearest-neighbour sampling).

crack-scan-eval ckpt_path=RUN/checkpoints/best.ckpt \
    photos=[../shared/data/photos/crackconcrete_004.png] scan.stride=76 out=scan_eval
(each photo's mask is PHOTO_mask.png beside it)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from crack_lightning.cli import run_tool
from crack_lightning.data.decode import load_rgb
from crack_lightning.errors import PredictionError
from crack_lightning.evaluation.metrics import binary_scores, counts, f1, precision, recall
from crack_lightning.evaluation.threshold import decision_threshold
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.scan import ScanResult, render_scan, scan_photo


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


def evaluate(cfg: DictConfig) -> None:
    """crack-scan-eval's body: scan each photo, score its patches against its mask."""
    classifier = load_classifier(cfg.ckpt_path, cfg.device)
    threshold = decision_threshold(cfg.threshold, classifier.threshold)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for photo_path in map(Path, cfg.photos):
        photo = load_rgb(photo_path)
        result = scan_photo(
            classifier,
            photo,
            photo_path,
            cfg.scan.patch_size,
            cfg.scan.stride,
            cfg.batch_size,
            threshold,
            cfg.scan.unfamiliar_limit,
        )
        mask = load_mask(photo_path.with_name(photo_path.stem + "_mask.png"), photo.size)
        truth = patch_truth(result, mask, float(cfg.min_share))
        report[photo_path.name] = patch_scores(result, truth)
        render_scan(result, photo).save(out / f"{photo_path.stem}_scan.png")
    (out / "scan_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    """`crack-scan-eval`: settings from conf/scan_eval.yaml."""
    return run_tool("scan_eval", evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
