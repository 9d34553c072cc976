"""`crack-scan-eval`: patch-level crack precision, recall, F1 and ROC-AUC of a scan
against each photo's crack mask, PHOTO_mask.png beside it (settings: conf/scan_eval.yaml),
per photo and per folder given (micro figures: every patch of the folder's photos pooled),
and pixel-level precision, recall and F1 within pixel_tolerance where the scan maps
cracks; masks are found, checked and fitted to their photos by data/masks.py.

crack-scan-eval ckpt_path=RUN/checkpoints/best.ckpt \
    photos=[../shared/data/masked/cracktile,../shared/data/photos/crackconcrete_004.png] \
    scan.patch_size=128 scan.stride=64 out=scan_eval
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from omegaconf import DictConfig

from crack_lightning.cli import run_tool
from crack_lightning.data.decode import load_rgb
from crack_lightning.data.masks import load_mask
from crack_lightning.errors import PredictionError, UnreadableImage
from crack_lightning.evaluation.scan_masks import (
    expand_photos,
    format_scores,
    score_groups,
    unique_photos,
    write_scan_summary,
)
from crack_lightning.evaluation.threshold import decision_threshold
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.scan import ScanSettings, scan_files
from crack_lightning.io import check_writable
from crack_lightning.settings import OPEN_UNIT, Rule, at_least, settings_of


@dataclass(frozen=True)
class ScanEvalSettings:
    """conf/scan_eval.yaml (its scan.* are ScanSettings)."""

    settings_error = PredictionError
    ckpt_path: str
    photos: list[str]
    # a patch is crack in the mask when at least this share of its pixels is
    min_share: Annotated[float, Rule("in (0, 1]", lambda v: 0 < v <= 1)]
    threshold: Annotated[float | None, OPEN_UNIT]  # null: the model's stored threshold
    # a crack map's pixel is right within this distance (pixels) of the mask's crack
    pixel_tolerance: Annotated[float, at_least(0, "a distance in pixels")]
    batch_size: Annotated[int, at_least(1)]
    device: str
    out: str
    log_dir: str | None  # TensorBoard scalars of the summary; null: none


def evaluate(cfg: DictConfig) -> None:
    """Scan each photo, score its patches (and its crack map's pixels, where the scan
    has one) against its mask; write scan_eval.json (per photo, null where a figure is
    undefined), scan_summary.csv and .md (per folder), and TensorBoard scalars under
    log_dir if set; print both reports (n/a where undefined)."""
    settings = settings_of(cfg, ScanEvalSettings, "", others=("paths", "scan", "task_name"))
    window = settings_of(cfg.scan, ScanSettings, "scan")
    check_writable(Path(settings.out), "out", folder=True, make=False)
    if settings.log_dir is not None:
        check_writable(Path(settings.log_dir), "log_dir", folder=True, make=False)
    groups = expand_photos(settings.photos)
    check_masks([photo for _, photos in groups for photo in photos])
    classifier = load_classifier(settings.ckpt_path, settings.device)
    window = window.for_model(classifier.window)
    threshold = decision_threshold(settings.threshold, classifier.threshold)
    out = Path(settings.out)
    skipped: list[tuple[Path, str]] = []
    scans = scan_files(
        classifier, unique_photos(groups), window, settings.batch_size, threshold, out, skipped
    )
    report, rows = score_groups(
        groups, scans, settings.min_share, pixel_tolerance=settings.pixel_tolerance
    )
    for path, reason in skipped:
        print(f"Skipped {path}: {reason}", file=sys.stderr)
    if not report:
        raise PredictionError("No photo could be scanned (see the skipped files above).")
    tolerance = settings.pixel_tolerance
    if settings.log_dir is None:
        summary = write_scan_summary(out, report, rows, threshold, pixel_tolerance=tolerance)
    else:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(settings.log_dir) as writer:
            summary = write_scan_summary(
                out, report, rows, threshold, writer.add_scalar, pixel_tolerance=tolerance
            )
    print(format_scores(report))
    print(f"\n{summary}")


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
