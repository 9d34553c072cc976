"""`crack-scan-eval`: patch-level crack precision and recall of a scan against each
photo's crack mask, PHOTO_mask.png beside it (settings: conf/scan_eval.yaml); masks are
found, checked and fitted to their photos by data/masks.py.

crack-scan-eval ckpt_path=RUN/checkpoints/best.ckpt \
    photos=[../shared/data/photos/crackconcrete_004.png] scan.stride=76 out=scan_eval
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from crack_lightning.cli import run_tool
from crack_lightning.data.decode import load_rgb
from crack_lightning.data.masks import load_mask
from crack_lightning.errors import PredictionError, UnreadableImage
from crack_lightning.evaluation.scan_masks import format_scores, patch_scores, patch_truth
from crack_lightning.evaluation.threshold import decision_threshold
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.scan import scan_files
from crack_lightning.io import write_json
from crack_lightning.settings import ScanEvalSettings, ScanSettings, validate


def evaluate(cfg: DictConfig) -> None:
    """Scan each photo, score its patches against its mask; write scan_eval.json (null
    where a figure is undefined) and print the report (n/a there)."""
    settings = validate(cfg, ScanEvalSettings, "")
    window = validate(cfg.scan, ScanSettings, "scan")
    photos = [Path(photo) for photo in settings.photos]
    check_masks(photos)
    classifier = load_classifier(cfg.ckpt_path, cfg.device)
    threshold = decision_threshold(settings.threshold, classifier.threshold)
    out = Path(settings.out)
    skipped: list[tuple[Path, str]] = []
    report = {}
    for result in scan_files(
        classifier, photos, window, settings.batch_size, threshold, out, skipped
    ):
        path = result.path
        mask = load_mask(path, (result.width, result.height))
        truth = patch_truth(result, mask, settings.min_share)
        report[result.name + path.suffix] = patch_scores(result, truth)  # path.name if unique
    for path, reason in skipped:
        print(f"Skipped {path}: {reason}", file=sys.stderr)
    if not report:
        raise PredictionError("No photo could be scanned (see the skipped files above).")
    write_json(out / "scan_eval.json", report)
    print(format_scores(report))


def check_masks(photos: list[Path]) -> None:
    """Find and check every readable photo's mask, its size against the photo's included,
    before the model is read: a bad mask stops the command at once, not after the photos
    before it were scanned. Decoding a photo twice costs little beside scanning it."""
    for photo in photos:
        try:
            size = load_rgb(photo).size
        except UnreadableImage:
            continue  # the scan loop skips it and says why
        load_mask(photo, size)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: settings from conf/scan_eval.yaml."""
    return run_tool("scan_eval", evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
