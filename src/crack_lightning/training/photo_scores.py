"""Whole-photo scores at the end of training (scan_eval_at_end: true): the validation
photos of every masks source scanned with the best checkpoint, scored against their masks
as crack-scan-eval scores them (evaluation/scan_masks.py), into RUN/scan_eval/ and
TensorBoard (scan_eval/SOURCE/f1, ...). An adaptation scans its site's photos with
init_from too, for the before/after table and page (evaluation/before_after.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

from crack_lightning.data.decode import sample_file
from crack_lightning.data.masks import mask_levels, source_mask_file
from crack_lightning.data.sources import SourceSpec
from crack_lightning.evaluation.before_after import PhotoScans
from crack_lightning.evaluation.scan_masks import photo_name, score_groups, write_scan_summary
from crack_lightning.evaluation.threshold import decision_threshold
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.scan import ScanResult, ScanSettings, scan_figure, scan_files

log = logging.getLogger(__name__)

SCAN_DIR = "scan_eval"


def validation_photos(
    datamodule: L.LightningDataModule, only: str | None = None
) -> dict[int, list[Path]]:
    """The photos whose tiles are in the validation split, per masks source (its index);
    with `only`, of that source alone."""
    photos: dict[int, list[Path]] = {}
    specs = datamodule.sources.specs
    for index in datamodule.split["val"]:
        source = datamodule.sources.source[index]
        if specs[source].tiles is not None and only in (None, specs[source].name):
            photo = Path(sample_file(datamodule.samples[index][0]))
            known = photos.setdefault(source, [])
            if photo not in known:
                known.append(photo)
    return photos


def source_mask(spec: SourceSpec):
    """The mask reader of a masks source: its mask folder, suffix and grey levels."""

    def read(photo: Path, size: tuple[int, int]) -> np.ndarray:
        path = source_mask_file(spec, photo)
        return mask_levels(path, photo, size, spec.tiles.mask_values)[0]

    return read


def source_window(spec: SourceSpec) -> ScanSettings:
    """The scan windows of a masks source's photos: its tiles' size and stride."""
    return ScanSettings(spec.tiles.tile_size, spec.tiles.stride, None)


def window_note(spec: SourceSpec) -> str:
    """How a masks source's photos are scanned and scored, as the before/after page says."""
    window = source_window(spec).describe()
    return f"{window}, cracked from {spec.tiles.min_share:g} of a tile's pixels"


def scan_validation_photos(
    datamodule: L.LightningDataModule,
    trainer: L.Trainer,
    ckpt_path: str,
    out: Path,
    to_tensorboard: bool = True,
    only: str | None = None,
) -> PhotoScans | None:
    """Scan each masks source's validation photos (with `only`, that source's) with the
    checkpoint (windows of the source's tile_size and stride, its min_share); write the
    summary (and, to_tensorboard, its scalars); the scores per folder and per photo and
    each photo's overlay; None when there is no photo to scan."""
    photos = validation_photos(datamodule, only)
    if not photos:
        log.info("scan_eval_at_end: no masks source has validation photos; nothing scanned.")
        return None
    classifier = load_classifier(ckpt_path)
    threshold = decision_threshold(None, classifier.threshold)
    report: dict[str, dict] = {}
    rows: list[dict] = []
    figures: dict[str, Path] = {}
    windows: dict[str, str] = {}
    skipped: list[tuple[Path, str]] = []
    for source, files in photos.items():
        spec = datamodule.sources.specs[source]
        scans = scan_files(
            classifier,
            files,
            source_window(spec),
            datamodule.hparams.batch_size,
            threshold,
            out / spec.name,
            skipped,
        )
        groups = [(spec.name, files)]
        noted = noting_figures(scans, out / spec.name, f"{spec.name}/", figures)
        scored, source_rows = score_groups(groups, noted, spec.tiles.min_share, source_mask(spec))
        report |= {f"{spec.name}/{name}": scores for name, scores in scored.items()}
        rows += source_rows
        windows[spec.name] = window_note(spec)
    for path, reason in skipped:
        log.warning("scan_eval_at_end skipped %s: %s", path, reason)
    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    add_scalar = loggers[0].experiment.add_scalar if loggers and to_tensorboard else None
    table = write_scan_summary(out, report, rows, threshold, add_scalar, trainer.global_step)
    log.info("Whole-photo scores of the validation photos (%s):\n%s", out, table)
    return PhotoScans(ckpt_path, threshold, rows, report, figures, windows)


def noting_figures(
    scans: Iterable[ScanResult], folder: Path, prefix: str, figures: dict[str, Path]
) -> Iterator[ScanResult]:
    """The scans, each photo's overlay (where scan_files saved it in `folder`) noted in
    `figures` under its report name, as the scans go by (no map is kept)."""
    for result in scans:
        figures[prefix + photo_name(result)] = scan_figure(folder, result.name)
        yield result
