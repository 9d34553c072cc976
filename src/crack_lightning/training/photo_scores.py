"""Whole-photo scores at the end of training (scan_eval_at_end: true): the validation
photos of every masks source scanned with the best checkpoint, scored against their masks
as crack-scan-eval scores them (evaluation/scan_masks.py), into RUN/scan_eval/ and
TensorBoard (scan_eval/SOURCE/f1, ...)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

from crack_lightning.data.decode import sample_file
from crack_lightning.data.masks import mask_levels, source_mask_file
from crack_lightning.data.sources import SourceSpec
from crack_lightning.evaluation.scan_masks import score_groups, write_scan_summary
from crack_lightning.evaluation.threshold import decision_threshold
from crack_lightning.inference.classifiers import load_classifier
from crack_lightning.inference.scan import ScanSettings, scan_files

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


def scan_validation_photos(
    datamodule: L.LightningDataModule,
    trainer: L.Trainer,
    ckpt_path: str,
    out: Path,
    to_tensorboard: bool = True,
    only: str | None = None,
) -> list[dict]:
    """Scan each masks source's validation photos (with `only`, that source's) with the
    checkpoint (windows of the source's tile_size and stride, its min_share); write the
    summary (and, to_tensorboard, its scalars); its rows."""
    photos = validation_photos(datamodule, only)
    if not photos:
        log.info("scan_eval_at_end: no masks source has validation photos; nothing scanned.")
        return []
    classifier = load_classifier(ckpt_path)
    threshold = decision_threshold(None, classifier.threshold)
    report: dict[str, dict] = {}
    rows: list[dict] = []
    skipped: list[tuple[Path, str]] = []
    for source, files in photos.items():
        spec = datamodule.sources.specs[source]
        window = ScanSettings(spec.tiles.tile_size, spec.tiles.stride, None)
        scans = scan_files(
            classifier,
            files,
            window,
            datamodule.hparams.batch_size,
            threshold,
            out / spec.name,
            skipped,
        )
        groups = [(spec.name, files)]
        scored, source_rows = score_groups(groups, scans, spec.tiles.min_share, source_mask(spec))
        report |= {f"{spec.name}/{name}": scores for name, scores in scored.items()}
        rows += source_rows
    for path, reason in skipped:
        log.warning("scan_eval_at_end skipped %s: %s", path, reason)
    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    add_scalar = loggers[0].experiment.add_scalar if loggers and to_tensorboard else None
    table = write_scan_summary(out, report, rows, threshold, add_scalar, trainer.global_step)
    log.info("Whole-photo scores of the validation photos (%s):\n%s", out, table)
    return rows


# the figures of before_after's table: (row key, heading)
COMPARED = (
    ("precision", "tile P"),
    ("recall", "tile R"),
    ("f1", "tile F1"),
    ("pixel_f1", "pixel F1"),
)


def before_after(before: list[dict], after: list[dict]) -> str:
    """A short table of the same photos scanned before and after adapting, one line per
    folder, and a warning where fewer cracked tiles are found than before."""

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [" | ".join(["folder", "photos", *(f"{name} before -> after" for _, name in COMPARED)])]
    warnings = []
    for old, new in zip(before, after, strict=True):
        cells = [f"{shown(old.get(k))} -> {shown(new.get(k))}" for k, _ in COMPARED]
        lines.append(" | ".join([str(new["folder"]), str(new["photos"]), *cells]))
        if new["found_patches"] < old["found_patches"]:
            warnings.append(
                f"{new['folder']}: {old['found_patches'] - new['found_patches']} cracked "
                f"tile(s) found before adapting are missed after (see the overlays in "
                f"scan_eval/before/ and scan_eval/)."
            )
    return "\n".join(lines + [f"WARNING {text}" for text in warnings])
